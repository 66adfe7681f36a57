"""Shared test setup: deterministic, single-threaded torch (CPU timing is noisy on shared cores), and `run_main`, which
runs a command line's `main(argv)` in this process the way `python -m ...` runs it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from multicrafter.errors import run_cli  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@dataclass
class CliResult:
    """What a command line left: its exit code and everything it wrote to stdout and stderr."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_main(capfd) -> Callable[..., CliResult]:
    """`run_main(main, argv)`: `main` run through `run_cli` (as every `python -m` entry point is), in this process.

    Bad-input cases use it to pin the exit code and the one-line message without paying a fresh interpreter's imports;
    each command line keeps one real subprocess test that proves the same end to end (one line, no traceback)."""

    def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[object]) -> CliResult:
        capfd.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_cli(main, [str(a) for a in argv])
        out, err = capfd.readouterr()
        return CliResult(int(exc.value.code or 0), out, err)

    return run
