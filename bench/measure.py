"""Helpers shared by the benchmarks: medians of interleaved repeats and peak memory per configuration."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Run each configuration `repeats` times in round-robin order (so drift hits all alike); median seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn: Callable[[], None], device: str) -> float | None:
    """Run `fn` once; the peak bytes allocated during it (CUDA allocator), or None on CPU (use the subprocess RSS
    or `saved_activation_bytes` instead)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fn()
    if not cuda:
        return None
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def saved_activation_bytes(step: Callable[[], None]) -> float:
    """Bytes autograd keeps for backward during one step (distinct storages): the CPU stand-in for peak memory."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return float(sum(storages.values()))
