"""One error type for everything a user can get wrong, and the CLI wrapper that turns it into one line.

Every command line in the project runs its `main` through `run_cli`, so bad input gives a single readable line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix (bad file, bad option, missing weights). Its message is shown as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one UserError line (via run_cli) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        """Raise the usage error as a UserError instead of printing usage and exiting."""
        raise UserError(f"{message} (see --help)")


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers ("0,1,2"); at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def one_line(exc: BaseException) -> str:
    """Collapse an exception to one line (first line of its message, with its type when not a UserError)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UserError):
        return msg or "error"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def quiet_libraries() -> None:
    """Keep library chatter (hub retries, optional-backend notices) off the user's screen; errors and the Hub's
    download progress bars still show."""
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    for name in ("huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main(argv)`; print one line and exit 2 on any error (set MULTICRAFTER_DEBUG=1 for tracebacks)."""
    quiet_libraries()
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the whole point: no traceback reaches the user
        if os.environ.get("MULTICRAFTER_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
