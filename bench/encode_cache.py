"""Speed of the training cache pass (train/data.py): one sample per encoder call vs `encode_many` (64 per chunk).

The shipped toy model (its VAE and frozen text encoders, as an adapter run sees them) encodes N ToyWorld training
scenes with their references and masks, both ways, on the same set; medians over interleaved repeats.
    python bench/encode_cache.py [--n 128] [--repeats 3] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.measure import interleaved_medians  # noqa: E402
from multicrafter.toyworld import write_dataset  # noqa: E402
from train.data import DataConfig, TrainingSet, load_samples  # noqa: E402
from train.run_setup import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_model("toy", torch.float32, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "tw", args.n, seed=0, split="train", size=128, ref_size=64, n_subjects=(1, 2, 3))
        folder = Path(tmp) / "tw"
        cfg = DataConfig(dataset=str(folder), resolution=128, ref_long_side_single=64, ref_long_side_multi=64, max_sequence_length=64)
        data = TrainingSet(load_samples(folder), cfg, pipe.reference_options, pipe.vae_scale_factor)

        def one_by_one() -> None:
            data._cache = {}
            for i in range(len(data)):
                data.encode_many([i], pipe, args.device, torch.float32)

        def batched() -> None:
            data._cache = {}
            for s in range(0, len(data), 64):
                data.encode_many(list(range(s, min(s + 64, len(data)))), pipe, args.device, torch.float32)

        med = interleaved_medians({"one sample per call": one_by_one, "encode_many (64 per chunk)": batched},
                                  args.repeats)
    base = med["one sample per call"]
    print(f"cache pass over {args.n} ToyWorld scenes (toy VAE + frozen text encoders, {args.device}, "
          f"{args.threads} threads, median of {args.repeats})")
    print("| way | seconds | samples/s | speed-up |\n|---|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {args.n / t:.0f} | x{base / t:.2f} |")


if __name__ == "__main__":
    main()
