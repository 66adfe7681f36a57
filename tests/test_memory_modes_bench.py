"""bench/memory_modes.py end to end on tiny shapes on CPU (the GPU modes are listed as refused)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory_modes import main  # noqa: E402


def test_tiny_shapes_on_cpu_write_the_table_with_refusals(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "modes.md"
    assert main(["--shapes", "tiny", "--device", "cpu", "--steps", "2", "--modes", "none", "int8", "nf4",
                 "--offloads", "none", "model", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| none") or line.startswith("| int8") or line.startswith("| nf4")]
    measured = [r for r in rows if "refused" not in r]
    assert len(measured) == 8          # (none, int8) x (stock, 2 refs, 2 refs + attention, + adapter) at 64 px
    assert any(r.startswith("| int8 | none | 64 | ours, 2 refs + attention") for r in measured)
    assert any(r.startswith("| int8 | none | 64 | ours, 2 refs + adapter") for r in measured)
    assert "| nf4 | none | - | refused: --quantize nf4 needs a CUDA GPU (bitsandbytes)" in "\n".join(rows)
    assert sum("refused: --offload model needs a CUDA GPU" in r for r in rows) == 2
    for r in measured:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[6]) > 0 and float(cells[4]) > 0     # s/step and weight MB
