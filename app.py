"""MultiCrafter app (desktop and Hugging Face Spaces): `python app.py [--model toy|tiny|HUB_ID|DIR] [--adapter NAME|DIR]
[--port N] [--host H] [--train | --no-train]`.

The Train tab starts processes on the server, so it is off unless the app is only reachable from this machine: on a
Space (SPACE_ID set) and with a non-loopback --host (e.g. 0.0.0.0) it needs an explicit --train.

Every flag has an environment variable for Spaces: MULTICRAFTER_MODEL, MULTICRAFTER_ADAPTER, MULTICRAFTER_DISABLE_TRAIN
(training is off by default on a Space, i.e. when SPACE_ID is set), MULTICRAFTER_TRAIN=1 (like --train; so is MULTICRAFTER_DISABLE_TRAIN=0),
MULTICRAFTER_DATA_DIR, MULTICRAFTER_RUNS_DIR,
MULTICRAFTER_OUTPUT_DIR, MULTICRAFTER_SAM2, MULTICRAFTER_FLORENCE, MULTICRAFTER_QUANTIZE, MULTICRAFTER_OFFLOAD; the port also follows GRADIO_SERVER_PORT.
Hub models (SAM 2, Florence-2) download on first use as the Hugging Face libraries do; HF_HUB_OFFLINE=1 keeps
them to the local cache.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from demo.state import AppConfig, env_flag
from multicrafter.errors import UserError, quiet_libraries, run_cli


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=env("MULTICRAFTER_MODEL", "toy"),
                   help="toy (embedded; falls back to tiny when absent), tiny (random), a diffusers folder or hub id")
    p.add_argument("--adapter", default=env("MULTICRAFTER_ADAPTER"),
                   help="named adapter of the model, a folder, a LoRA file or a Hub id owner/name[/file]")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="0.0.0.0 to serve the network")
    p.add_argument("--no-train", action="store_true",
                   default=env_flag("MULTICRAFTER_DISABLE_TRAIN", default=bool(env("SPACE_ID"))),
                   help="disable the Train tab (shared servers)")
    opted_in = env("MULTICRAFTER_DISABLE_TRAIN") is not None and not env_flag("MULTICRAFTER_DISABLE_TRAIN")
    p.add_argument("--train", action="store_true", default=env_flag("MULTICRAFTER_TRAIN") or opted_in,
                   help="enable the Train tab also when serving the network (--host other than localhost)")
    p.add_argument("--data-dir", default=env("MULTICRAFTER_DATA_DIR", "datasets"), help="where datasets live")
    p.add_argument("--runs-dir", default=env("MULTICRAFTER_RUNS_DIR", "runs"), help="where training runs go")
    p.add_argument("--output-dir", default=env("MULTICRAFTER_OUTPUT_DIR", "outputs"), help="generated images")
    p.add_argument("--sam2", default=env("MULTICRAFTER_SAM2"),
                   help="SAM 2 hub id or folder for the Annotate tab (default facebook/sam2.1-hiera-tiny; hub ids "
                        "download on first use unless HF_HUB_OFFLINE=1; GrabCut when unavailable, or 'grabcut')")
    p.add_argument("--florence", default=env("MULTICRAFTER_FLORENCE"),
                   help="Florence-2 hub id or folder for auto-annotation (default "
                        "florence-community/Florence-2-base-ft, downloaded on first use unless HF_HUB_OFFLINE=1)")
    p.add_argument("--device", default=env("MULTICRAFTER_DEVICE"), help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--quantize", default=env("MULTICRAFTER_QUANTIZE", "none"),
                   help="none, int8 or fp8 (torchao; CPU or GPU), nf4 (bitsandbytes; GPU): transformer and T5 weights")
    p.add_argument("--offload", default=env("MULTICRAFTER_OFFLOAD", "none"),
                   help="none, model or sequential: diffusers' CPU offload for small GPUs (needs CUDA)")
    p.add_argument("--no-warmup", action="store_true", help="load the model on the first request, not at launch")
    return p


def is_loopback(host: str) -> bool:
    """True for localhost / 127.x / ::1; 0.0.0.0, '' and any other name serve (or may serve) the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def train_enabled(args: argparse.Namespace) -> bool:
    """--no-train wins; --train enables; otherwise on only for a loopback host (prints one line when it is off)."""
    if args.no_train:
        return False
    if args.train:
        return True
    if not is_loopback(args.host):
        print(f"note: the Train tab is disabled because --host {args.host} serves the network; pass --train to "
              "enable it", file=sys.stderr, flush=True)
        return False
    return True


def make_app(argv: Sequence[str] | None = None):
    """(demo, args): the Blocks app built from command-line flags and environment variables."""
    args = build_parser().parse_args(argv)
    if args.port <= 0 or args.port > 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    from multicrafter.memory import check_modes

    check_modes(args.quantize, args.offload)
    from demo import ModelHolder, build_app

    cfg = AppConfig(model=args.model, adapter=args.adapter, data_dir=Path(args.data_dir), runs_dir=Path(args.runs_dir),
                    output_dir=Path(args.output_dir), train_enabled=train_enabled(args), sam2=args.sam2,
                    florence=args.florence, device=args.device, quantize=args.quantize, offload=args.offload)
    holder = ModelHolder(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize, offload=cfg.offload)
    if holder.note:
        print(f"note: {holder.note}", file=sys.stderr, flush=True)
    if not args.no_warmup:
        holder.warm_up()
    return build_app(holder, config=cfg), args


def exit_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd, Spaces) exits through sys.exit, so atexit stops a running training job."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: Sequence[str] | None = None) -> int:
    from demo import launch_kwargs

    exit_on_sigterm()
    demo, args = make_app(argv)
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs(demo))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    if os.environ.get("SPACE_ID"):   # Spaces runs `python app.py` and expects 0.0.0.0
        os.environ.setdefault("GRADIO_SERVER_NAME", "0.0.0.0")
    run_cli(main)
