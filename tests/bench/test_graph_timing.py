"""capture_graph / graph_us_in_turn (tilemoe.bench.timing): the graphs the tuner and the probes time (GPU only)."""

import pytest
import torch

from tilemoe.bench.timing import capture_graph, graph_us_in_turn


@pytest.mark.gpu
def test_capture_graph_holds_the_calls_and_replays_them():
    counter = torch.zeros(4, device="cuda")

    def bump():
        counter.add_(1.0)
        return counter

    graph, out = capture_graph(bump, calls=3, warmup=2)
    assert out is counter
    torch.cuda.synchronize()
    assert counter.tolist() == [2.0] * 4  # the warm-up calls ran, the captured ones did not
    graph.replay()
    torch.cuda.synchronize()
    assert counter.tolist() == [5.0] * 4
    times = graph_us_in_turn([(graph, 3), (graph, 1)], rounds=3)
    assert len(times) == 2 and all(t > 0 for t in times)
    torch.cuda.synchronize()
    assert counter.tolist() == [5.0 + 3 * 2 * 3] * 4  # 3 rounds x 2 entries, each replay adds 3
