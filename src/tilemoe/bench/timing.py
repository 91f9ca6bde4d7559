"""Timing one callable: CUDA events (or CUDA-graph replays) on a GPU, perf_counter on CPU.

``measure(fn, inputs, ...)`` is the single-call entry point (also used by the expert-parallel bench);
``Timer`` lets the runner interleave implementations: each is prepared once, then timed a few iterations per
round, round after round, so slow drift of the device clock (an H100 under its power cap) hits all alike.

``capture_graph`` / ``graph_us_in_turn``: CUDA graphs of several calls each, replayed in turn (the tuner and the
development probes in bench/).

``inputs`` is a list of input sets; call i uses ``inputs[i % len(inputs)]`` so that several sets rotate when
one set would stay in L2 between calls (the runner makes 3 sets when the activations are small).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TimingStats:
    """Per-call times in milliseconds and their summary."""

    times_ms: list[float] = field(default_factory=list)
    cuda_graph: bool = False  # True when the times are CUDA-graph replays
    graph_calls: int = 1  # calls per replayed graph: each time is a replay's time divided by it
    note: str = ""  # e.g. why a requested CUDA graph was not used

    def extend(self, other: TimingStats) -> None:
        self.times_ms.extend(other.times_ms)

    def _pct(self, q: float) -> float:
        if not self.times_ms:
            return math.nan
        ordered = sorted(self.times_ms)
        pos = q / 100 * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times_ms) if self.times_ms else math.nan

    @property
    def std(self) -> float:
        return statistics.pstdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def p50(self) -> float:
        return self._pct(50)

    @property
    def p95(self) -> float:
        return self._pct(95)

    @property
    def p99(self) -> float:
        return self._pct(99)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times ``fn(inputs[i])``; with ``cuda_graph`` one graph per input set is captured and replayed.

    With ``graph_calls`` > 1 each graph holds that many calls back to back, the input sets taken in turn from its
    own: a sample is a replay's time divided by the calls, the layer's time inside a larger graph (a model's
    decode step), without the launch of a graph of its own each time.
    A forward that cannot be captured (it reads values back to the host, as levels 3 and 4 do) is timed
    eagerly instead and ``stats.note`` says so.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        inputs: Sequence[Any],
        *,
        device: torch.device,
        cuda_graph: bool = False,
        graph_calls: int = 1,
    ):
        if not inputs:
            raise ValueError("inputs: expected at least one input set, got none")
        if not isinstance(graph_calls, int) or graph_calls < 1:
            raise ValueError(f"graph_calls: expected an int >= 1, got {graph_calls!r}")
        self.fn, self.inputs, self.device = fn, list(inputs), torch.device(device)
        self.graph_calls = graph_calls
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.note = ""
        self._calls = 0
        if cuda_graph:
            if self.device.type != "cuda":
                self.note = "cuda graph needs a CUDA device: timed eagerly"
            else:
                self._capture()

    def _host_sync_error(self) -> str | None:
        """Run once with synchronising CUDA calls turned into errors: a forward that reads values back to the
        host cannot be captured, and a failed capture can leave the CUDA context unusable, so ask first."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self.fn(self.inputs[0])
        except RuntimeError as error:
            if "out of memory" in str(error):
                raise
            return str(error).splitlines()[0][:100]
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return None

    def _capture(self) -> None:
        sync_error = self._host_sync_error()
        if sync_error is not None:
            self.note = f"not capturable in a CUDA graph (it synchronises with the host: {sync_error}): timed eagerly"
            return
        graphs = []
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for inp in self.inputs:  # warm-up off the capture (allocator, lazy init, autotuning)
                    self.fn(inp)
            torch.cuda.current_stream().wait_stream(stream)
            n = len(self.inputs)
            for first in range(n):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for call in range(self.graph_calls):
                        self.fn(self.inputs[(first + call) % n])
                graphs.append(graph)
            self.graphs = graphs
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
                raise
            torch.cuda.synchronize()
            self.note = f"not capturable in a CUDA graph ({str(error).splitlines()[0][:80]}): timed eagerly"
            self.graphs = None

    def _call(self, i: int) -> None:
        if self.graphs is not None:
            self.graphs[i % len(self.graphs)].replay()
        else:
            self.fn(self.inputs[i % len(self.inputs)])

    def warmup(self, iters: int) -> None:
        for _ in range(iters):
            self._call(self._calls)
            self._calls += 1
        _synchronize(self.device)

    def run(self, iters: int) -> TimingStats:
        """Time ``iters`` calls, one sample each."""
        times: list[float] = []
        if self.device.type == "cuda":
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
            ]
            for start, end in events:
                start.record()
                self._call(self._calls)
                end.record()
                self._calls += 1
            torch.cuda.synchronize(self.device)
            calls = self.graph_calls if self.graphs is not None else 1
            times = [start.elapsed_time(end) / calls for start, end in events]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                self._call(self._calls)
                times.append((time.perf_counter() - t0) * 1e3)
                self._calls += 1
        graphs = self.graphs is not None
        return TimingStats(
            times_ms=times, cuda_graph=graphs, graph_calls=self.graph_calls if graphs else 1, note=self.note
        )


def measure(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    warmup: int,
    iters: int,
    device: torch.device | str,
    cuda_graph: bool = False,
) -> TimingStats:
    """Warm up, then time ``iters`` calls of ``fn(inputs[i % len(inputs)])``; per-call milliseconds.

    Raises whatever ``fn`` raises (``torch.OutOfMemoryError`` included).
    """
    timer = Timer(fn, inputs, device=torch.device(device), cuda_graph=cuda_graph)
    timer.warmup(warmup)
    return timer.run(iters)


def capture_graph(fn: Callable[[], Any], calls: int = 1, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(a CUDA graph of ``calls`` calls of ``fn()``, the last call's output): ``warmup`` calls first, on a side
    stream (as capture wants), then the capture. The graph is not replayed yet."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out


def graph_us_in_turn(
    graphs: Sequence[tuple[torch.cuda.CUDAGraph, int]], rounds: int, rest: float = 0.0, sleep=time.sleep
) -> list[float]:
    """Median microseconds per call of each (graph, calls it holds), replaying the graphs in turn, one replay each
    per round, so that a drifting clock hits all of them alike. ``rest`` > 0 leaves the GPU idle ``rest`` times each
    replay's length after it (``sleep``), so the replays run at a duty cycle of 1 / (1 + rest) instead of back to
    back, closer to the bench, where one implementation's chunk runs between the others' (on an H100 the power cap
    slows a sustained compute-bound kernel more than one that runs in bursts)."""
    if not rest >= 0:  # also NaN
        raise ValueError(f"rest: expected >= 0 (idle time over replay time), got {rest}")
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for i, (graph, calls) in enumerate(graphs):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            torch.cuda.synchronize()
            elapsed_ms = start.elapsed_time(stop)
            times[i].append(elapsed_ms * 1e3 / calls)
            if rest:
                sleep(rest * elapsed_ms * 1e-3)
    return [statistics.median(ts) for ts in times]
