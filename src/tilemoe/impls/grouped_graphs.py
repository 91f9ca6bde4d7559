"""Level 5 of the ladder: level 4 replayed from CUDA graphs.

What changes from level 4: at small T the layer is launch-bound (a sort, a gather, about 5 kernels per hit
expert, a scatter: hundreds of launches for 128 experts) and the GPU waits on the CPU. A CUDA graph records
those launches once and replays them with one call.

Level 4 reads the per-expert counts on the host to slice the sorted rows, and a graph bakes those slice
bounds in. So a graph is captured per (input shapes, dtypes, per-expert counts) and replayed only for inputs
with the same counts: the counts are still read once per call (one sync), the ids, weights and activations
are copied into the graph's static inputs and everything else is recomputed from them on replay, so a replay
is exactly level 4 on the new values. Up to ``MAX_GRAPHS`` graphs are kept (least recently used dropped), all
for one token count: each graph holds its own memory pool (about 3 GB at 32768 tokens of qwen3-30b-a3b), so
a new token count drops the graphs of the old one.

CUDA only: there is no graph capture on CPU (the ``tilemoe journey`` CPU run shows it as unavailable).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from tilemoe.impls._registry import register_impl
from tilemoe.impls.grouped import grouped_forward

MAX_GRAPHS = 4
_GRAPHS: OrderedDict[tuple, tuple] = OrderedDict()


def _capture(x, w13, w2, topk_weights, topk_ids, config, b13, b2, counts_host):
    static = {"x": x.clone(), "topk_weights": topk_weights.clone(), "topk_ids": topk_ids.clone()}

    def forward():
        return grouped_forward(
            static["x"],
            w13,
            w2,
            static["topk_weights"],
            static["topk_ids"],
            config=config,
            b13=b13,
            b2=b2,
            counts_host=counts_host,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, as CUDA graphs require
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, static, out


@register_impl(
    "grouped_graphs",
    level=5,
    description="level 4 replayed from a CUDA graph captured per shape and per-expert counts",
    devices=("cuda",),
    auto_priority=5,
)
def grouped_graphs_experts(x, w13, w2, topk_weights, topk_ids, *, config, b13=None, b2=None):
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        # an outer capture (bench --cuda-graph) records level 4's launches itself
        return grouped_forward(x, w13, w2, topk_weights, topk_ids, config=config, b13=b13, b2=b2)
    counts_host = tuple(torch.bincount(topk_ids.reshape(-1).long(), minlength=w13.shape[0]).tolist())
    key = (
        tuple(x.shape),
        x.dtype,
        tuple(topk_ids.shape),
        w13.data_ptr(),
        w2.data_ptr(),
        None if b13 is None else b13.data_ptr(),
        None if b2 is None else b2.data_ptr(),
        id(config),
        counts_host,
    )
    entry = _GRAPHS.get(key)
    if entry is None:
        for stale in [k for k in _GRAPHS if k[0] != key[0]]:
            del _GRAPHS[stale]
        entry = _capture(x, w13, w2, topk_weights, topk_ids, config, b13, b2, list(counts_host))
        _GRAPHS[key] = entry
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    graph, static, out = entry
    static["x"].copy_(x)
    static["topk_weights"].copy_(topk_weights)
    static["topk_ids"].copy_(topk_ids)
    graph.replay()
    return out.clone()
