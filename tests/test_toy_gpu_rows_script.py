"""train/toy_gpu_rows.sh, the GPU recipe that trains several adapter rows of the toy at once within a fixed time budget
and scores them: each row gets its own sets (over the common ones), a row still training when the rows' share of the
budget ends is cut off and packed as its last checkpoint, every finished row is scored, IPPO runs from the chosen row,
and every pack is complete (cut into parts over SPLIT_MB).

As in test_toy_gpu_script.py, the commands are stand-ins checked against the real parsers and configs, and the script
reads its time from a clock file that the test moves forward once the short rows are done."""

import json
import os
import re
import tarfile
from pathlib import Path

from tests import fake_training_clis as fake
from tests.test_toy_gpu_script import _checkpoints, _finish, _start, _wait_for

ROOT = Path(__file__).resolve().parents[1]


def _unsplit(pack: Path, name: str, tmp: Path) -> Path:
    """The tar NAME as packed: whole, or its parts NAME.00, NAME.01, ... put back together."""
    if (pack / name).exists():
        return pack / name
    out = tmp / name
    out.write_bytes(b"".join(p.read_bytes() for p in sorted(pack.glob(f"{name}.[0-9][0-9]"))))
    return out


def _arg(call: dict, flag: str) -> str:
    """The value of the last `flag` in a logged command line (the one argparse keeps)."""
    argv = call["argv"]
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def test_rows_train_with_their_own_sets_are_cut_at_the_budget_scored_and_packed(tmp_path):
    runs, pack, clock = tmp_path / "runs", tmp_path / "pack", tmp_path / "clock"
    clock.write_text("0")
    budget, reserve = 1000, 150
    env = {**os.environ, **fake.install(tmp_path), "CLOCK_FILE": str(clock), "FAKE_ADAPTER_BYTES": str(700_000),
           "RUNS": str(runs), "PACK": str(pack), "BUDGET": str(budget), "EVAL_RESERVE": str(reserve), "SPLIT_MB": "1",
           "COMMON_SET": "--set train.max_steps=2 --set output.checkpoint_every=1 --set data.positions_caption_prob=0.5",
           "EVAL_BASE": "1",
           "ROWS": "plain toy_adapter_baseline\n\nr8 toy_adapter_attn --set adapter.lora_rank=8 "
                   "--set attention_loss.mode=img2ref\n"
                   f"long toy_adapter_baseline --set train.max_steps={fake.OUT_OF_REACH}\n",
           "EVAL_ARGS": "--n 1 --seeds 0 --steps 2 --true-cfg 1 --prompts positions --device cpu",
           "IPPO_FROM": "r8",
           # IPPO runs to its end here (IPPO cut off at the budget is tested on train/toy_gpu.sh)
           "IPPO_SET": "--set train.max_steps=2 --set train.save_every=1"}
    proc = _start("train/toy_gpu_rows.sh", env)
    _wait_for(lambda: (runs / "plain" / "adapter").is_dir() and (runs / "r8" / "adapter").is_dir()
              and len(_checkpoints(runs / "long")) > 0, "two finished rows and a checkpoint of the long one", proc)
    clock.write_text(str(budget - reserve))  # the rows' share of the budget is spent: `long` is cut off
    out, err = _finish(proc)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "row long stopped early (rc 124)" in out and "evaluations: 3 written" in out
    assert "ippo stopped" not in out and "ippo packed" in out

    calls = fake.calls(tmp_path)
    parsed = dict(zip(range(len(calls)), fake.check_with_real_parsers(calls)))
    train = {Path(_arg(c, "--output-dir")).name: parsed[i] for i, c in enumerate(calls)
             if c["module"] == "train.pretrain"}
    assert sorted(train) == ["_prepare", "long", "plain", "r8"]
    assert [c["env"].get("OMP_NUM_THREADS") for c in calls if c["module"] == "train.pretrain"] == [None, "2", "2", "2"]
    assert calls[0]["module"] == "train.pretrain" and _arg(calls[0], "--max-steps") == "1"  # the data, written once
    for cfg in train.values():
        assert cfg.model.name == "toy" and cfg.data.positions_caption_prob == 0.5  # the common sets reach every row
    assert train["r8"].adapter.lora_rank == 8 and train["r8"].attention_loss.mode == "img2ref"  # the row's own sets
    assert train["plain"].adapter.lora_rank != 8 and train["plain"].train.max_steps == 2
    assert train["long"].train.max_steps == fake.OUT_OF_REACH  # a row's set wins over the common one
    evals = {Path(_arg(c, "--json")).name: parsed[i] for i, c in enumerate(calls) if c["module"] == "multicrafter.eval"}
    assert sorted(evals) == ["eval_base.json", "eval_plain.json", "eval_r8.json"]  # the cut-off row is not scored
    assert evals["eval_base.json"].no_adapter and evals["eval_base.json"].adapter is None
    for row in ("plain", "r8"):
        args = evals[f"eval_{row}.json"]
        assert args.adapter == str(runs / row / "adapter") and args.n == 1 and args.prompts == "positions"
        assert args.seeds == [0] and args.device == "cpu"
    (ippo,) = [parsed[i] for i, c in enumerate(calls) if c["module"] == "train.ippo"]
    assert ippo.model.adapter == str(runs / "r8" / "adapter") and ippo.train.max_steps == 2

    names = sorted(p.name for p in pack.iterdir())
    whole = {n.split(".tar")[0] + ".tar" for n in names}
    assert whole == {"evals.tar", "ippo.tar", "ippo_checkpoint.tar", "rows.tar"}, names + [out[-2000:]]
    parts = [n for n in names if n.startswith("rows.tar.")]  # rows.tar is over SPLIT_MB: cut in parts
    assert len(parts) >= 2 and parts == [f"rows.tar.{k:02d}" for k in range(len(parts))], names
    assert all((pack / n).stat().st_size <= 2**20 for n in names)
    with tarfile.open(_unsplit(pack, "rows.tar", tmp_path)) as t:
        got = t.getnames()
    for row in ("plain", "r8"):
        assert f"{row}/adapter/adapter_config.json" in got and f"{row}/metrics.jsonl" in got and f"{row}.log" in got
    newest = _checkpoints(runs / "long")[-1]
    assert f"long/checkpoint-{newest}/state.pt" in got and not any(".tmp" in n for n in got)
    assert re.search(rf"row long: checkpoint-{newest}\b", out)
    with tarfile.open(pack / "evals.tar") as t:
        t.extractall(tmp_path / "evals", filter="data")
    for row in ("base", "plain", "r8"):
        assert json.loads((tmp_path / "evals" / "evals" / f"eval_{row}.json").read_text())["n"] == 1
    with tarfile.open(_unsplit(pack, "ippo_checkpoint.tar", tmp_path)) as t:
        assert any(n.endswith("state.pt") for n in t.getnames())
    with tarfile.open(pack / "ippo.tar") as t:
        got = t.getnames()
    assert "ippo_r8/adapter/adapter_config.json" in got and not any("checkpoint-" in n for n in got)
