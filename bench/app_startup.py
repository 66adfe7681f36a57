"""Seconds from `python app.py` to the first successful /generate on the default model (target <= 20 s on CPU).

Starts the app as a subprocess (default model: `toy`, or `tiny` when the toy model is not installed; the app says
which), polls until the server answers, then calls /generate with two ToyWorld references at the model's default
steps and size; repeats `--repeats` times (fresh process each) and prints the median.

    python bench/app_startup.py [--model toy] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from demo.examples import make_examples  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(model: str | None, refs: list[str], prompt: str, work: Path, timeout: float = 180.0) -> dict:
    port = _free_port()
    cmd = [sys.executable, "app.py", "--port", str(port), "--no-train", "--output-dir", str(work / "out"),
           "--data-dir", str(work / "data"), "--runs-dir", str(work / "runs")]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        client, t_up = None, None
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited early: {proc.stdout.read()[-2000:]}")
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                t_up = time.perf_counter() - t0
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        if client is None:
            raise RuntimeError("server did not come up")
        args = dict(references=[{"image": handle_file(r), "caption": None} for r in refs], name_1="a", name_2="b",
                    name_3="", name_4="", prompt=prompt, seed=0)
        _, path, params, notes = client.predict(**args, api_name="/generate")
        t_gen = time.perf_counter() - t0
        return dict(seconds_to_first_generate=t_gen, seconds_to_server_up=t_up, model=params["model"],
                    adapter=params["adapter"], steps=params["num_inference_steps"],
                    size=[params["height"], params["width"]], note=notes.splitlines()[-1] if notes else "")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the app's default (toy, or tiny as its fallback)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ex = make_examples(work / "examples", size=128)[0]
        runs = [one_run(args.model, ex.references, ex.prompt, work) for _ in range(args.repeats)]
    secs = [r["seconds_to_first_generate"] for r in runs]
    out = dict(median_seconds_to_first_generate=statistics.median(secs), runs=runs, target_seconds=20,
               cpu_count=os.cpu_count())
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
