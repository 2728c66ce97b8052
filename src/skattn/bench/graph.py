"""The CUDA-graph timer: NL layers' calls in one graph, each layer with its own inputs.

A decode step of a model runs as one CUDA graph, so no layer pays a launch from the host, and
every layer reads its own KV cache, which the layers before it have pushed out of L2. The
graph timer measures that: per-layer time = replay time of one graph of NL calls (each layer
with its own Q/K/V and output) / NL, with the replay between CUDA events after an L2 flush
(`ColdTimer`). The event timer (`ColdTimer.time` of one call) stays for comparison: it also
charges each call the launch latency that a graph pays once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from skattn.bench.timing import Timing, summarize

TIMERS = ("graph", "event")
DEFAULT_LAYERS = 16


class NotCapturable(RuntimeError):
    """A provider's call could not be captured into a CUDA graph."""


class WrongOutput(RuntimeError):
    """A replayed graph wrote a wrong (or no) output."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def capture(fns: Sequence[Callable[[], torch.Tensor]]):
    """Warm every call up once on a side stream, then capture all of them into one graph.

    Parameters
    ----------
    fns : sequence of callables
        One call per layer, each launching on the current stream and returning its output.

    Returns
    -------
    (torch.cuda.CUDAGraph, list of Tensor)
        The graph and each layer's output. The outputs are kept alive with the graph, so no
        layer's output buffer is reused by a later layer inside the graph.

    Raises
    ------
    RuntimeError
        Without a CUDA GPU.
    NotCapturable
        When the capture fails (a call syncs, allocates in a way capture forbids, ...).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the graph timer needs a CUDA GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # lazy initialisation (workspaces, library handles) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outs = [fn() for fn in fns]
    except Exception as exc:
        try:
            torch.cuda.synchronize()
        except Exception:  # the failed capture's error surfaces here again; it is reported below
            pass
        raise NotCapturable(_first_line(exc)) from exc
    return graph, outs


def check_replay(graph, outs: Sequence[torch.Tensor], refs: dict[int, torch.Tensor], tolerance: float,
                 error: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """Poison every output with NaN, replay once and compare the outputs of the layers in `refs`.

    Parameters
    ----------
    graph
        Has `replay()`.
    outs : sequence of Tensor
        Every layer's output, as `capture` returned them.
    refs : dict of int to Tensor
        Float64 reference outputs by layer index.
    tolerance : float
        Largest accepted `error(out, ref)`.
    error : callable
        Relative error of an output against its reference (inf for NaN).

    Returns
    -------
    float
        The largest error seen.

    Raises
    ------
    WrongOutput
        When a checked layer's error exceeds `tolerance` (an unwritten output stays NaN).
    """
    for out in outs:
        if out.is_floating_point():
            out.fill_(float("nan"))
    graph.replay()
    if any(out.is_cuda for out in outs):
        torch.cuda.synchronize()
    worst = 0.0
    for i, ref in refs.items():
        err = error(outs[i], ref)
        if err > tolerance:
            raise WrongOutput(f"layer {i} of the replayed graph: relative error {err:.3e} > {tolerance:g}")
        worst = max(worst, err)
    return worst


def time_graph(graph, layers: int, timer, *, warmup: int, reps: int) -> Timing:
    """Per-layer time: quantiles of the replay time of `graph` (NL = `layers` calls) / NL.

    Parameters
    ----------
    graph
        Has `replay()`.
    layers : int
        Calls in the graph.
    timer : ColdTimer
        Flushes L2 and spins the GPU before each replay, and times it with CUDA events.
    warmup, reps : int
        Untimed and timed replays.

    Returns
    -------
    Timing
    """
    t = timer.time(graph.replay, warmup=warmup, reps=reps)
    return Timing(t.p20 / layers, t.p50 / layers, t.p80 / layers, t.reps)


def time_eager(fns: Sequence[Callable], layers: int, timer, *, warmup: int, reps: int) -> Timing:
    """Per-layer time of `fns` run eagerly, one after another, as a step without a CUDA graph
    runs: each run starts on an idle GPU after an L2 flush, and CUDA events around the calls
    include every gap in which the GPU waits for the host's next launch. / `layers`.

    Parameters
    ----------
    fns : sequence of callables
        One step's calls (`layers` of them are layers).
    layers : int
    timer : ColdTimer
        Its flush only (no spin before a run: a busy GPU would hide the host's time).
    warmup, reps : int
        Untimed and timed runs.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = []
    for _ in range(reps):
        timer.flush()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for fn in fns:
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return summarize(times)


class References:
    """Float64 reference outputs of a cell's layers, computed on first use and kept.

    Parameters
    ----------
    layers : sequence of (q, k, v)
        Every layer's inputs.
    reference : callable
        `reference(q, k, v, causal)` -> float64 output.
    """

    def __init__(self, layers, reference):
        self.layers, self.reference, self._cache = list(layers), reference, {}

    def get(self, i: int, causal: bool = True) -> torch.Tensor:
        """The reference of layer `i` (negative counts from the end), causal or over every key."""
        i = i % len(self.layers)
        if (i, causal) not in self._cache:
            self._cache[(i, causal)] = self.reference(*self.layers[i], causal=causal)
        return self._cache[(i, causal)]

    def checked(self, causal: bool = True) -> dict[int, torch.Tensor]:
        """References of the layers a replay is checked on: the first and the last."""
        return {i % len(self.layers): self.get(i, causal) for i in (0, -1)}
