"""Cold-L2 device timing with CUDA events, and the ceilings (copy bandwidth, matmul peak)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skattn.bench.floors import Ceilings

MIN_FLUSH_BYTES = 256 << 20
# GPU cycles to spin before each timed run, so that the CPU's launches queue up behind it and
# host overhead (a busy CPU, Python argument handling) never shows as a gap inside the timing.
# 2M cycles, ~1 ms at 2 GHz: several times a call's host time (~100 us for skattn; 400k cycles
# were too few when the CPU was slow: whole cells measured host-bound, bench-grid-read.csv)
SPIN_CYCLES = 2_000_000


@dataclass(frozen=True)
class Timing:
    """Quantiles of one measurement, in microseconds."""

    p20: float
    p50: float
    p80: float
    reps: int


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_us: list[float]) -> Timing:
    """p20/p50/p80 (linear interpolation, as numpy's default) of run times in microseconds."""
    if not times_us:
        raise ValueError("no times to summarize")
    s = sorted(times_us)
    return Timing(_quantile(s, 0.2), _quantile(s, 0.5), _quantile(s, 0.8), len(s))


FLUSH_MODES = ("read", "write")


class ColdTimer:
    """Times a callable with a cold L2: a buffer of >= 2x L2 goes through L2 before every run.

    Parameters
    ----------
    device : torch.device or int, optional
        The CUDA device (the current one by default).
    flush_bytes : int, optional
        Size of the flush buffer; max(256 MiB, 2 x L2) by default.
    flush : {"read", "write"}
        "read" (default) reads the buffer, leaving L2 full of clean lines of it. "write"
        overwrites it, as `triton.testing.do_bench` does: L2 is then full of dirty lines and
        the timed kernel also pays for writing ~L2-size bytes back to memory (measured in
        PERF.md: about 10 us on an H200). Both leave none of the timed kernel's inputs in L2.
    """

    def __init__(self, device=None, flush_bytes: int | None = None, flush: str = "read"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush must be one of {FLUSH_MODES}, got {flush!r}")
        if not torch.cuda.is_available():
            raise RuntimeError("ColdTimer times kernels on a CUDA GPU; none is available here")
        self.flush_mode = flush
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        props = torch.cuda.get_device_properties(self.device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        self.flush_bytes = flush_bytes or max(MIN_FLUSH_BYTES, 2 * l2)
        self._flush = torch.zeros(self.flush_bytes // 4, dtype=torch.int32, device=self.device)
        self._spin = getattr(torch.cuda, "_sleep", None)

    def flush(self) -> None:
        if self.flush_mode == "write":
            self._flush.zero_()
        else:
            torch.amax(self._flush)

    def time(self, fn, *, warmup: int = 10, reps: int = 100) -> Timing:
        """Run `fn` `warmup` times, then `reps` timed runs each after an L2 flush.

        Parameters
        ----------
        fn : callable
            Launches the work on the current stream; its result is ignored.
        warmup, reps : int

        Returns
        -------
        Timing
            Quantiles in microseconds of the device time between events around `fn`.
        """
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush()
            if self._spin is not None:
                self._spin(SPIN_CYCLES)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return summarize([1e3 * s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure_copy_bandwidth(timer: ColdTimer, nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write bytes (median run)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=timer.device).normal_()
    dst = torch.empty_like(src)
    t = timer.time(lambda: dst.copy_(src), warmup=3, reps=reps)
    del src, dst
    return 2 * nbytes / (t.p50 * 1e-6)


def measure_matmul_peak(timer: ColdTimer, size: int = 8192, reps: int = 20) -> float:
    """f16 matmul throughput in flop/s for size^3 (median run), accumulating in f32 (cuBLAS)."""
    a = torch.randn(size, size, dtype=torch.float16, device=timer.device)
    b = torch.randn(size, size, dtype=torch.float16, device=timer.device)
    t = timer.time(lambda: torch.mm(a, b), warmup=5, reps=reps)
    del a, b
    return 2 * size**3 / (t.p50 * 1e-6)


def measure_ceilings(timer: ColdTimer, *, quick: bool = False) -> Ceilings:
    """Both ceilings, measured now on the timer's GPU."""
    reps = 10 if quick else 30
    return Ceilings(measure_copy_bandwidth(timer, reps=reps), measure_matmul_peak(timer, reps=reps))
