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


@pytest.mark.gpu
def test_timer_graph_calls_cycle_the_inputs_and_divide_the_time():
    from tilemoe.bench.timing import Timer

    counters = [torch.zeros(1, device="cuda") for _ in range(2)]

    def bump(counter):
        torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time per call: the replay time is the calls', not the launch
        counter.add_(1.0)

    one = Timer(bump, counters, device="cuda", cuda_graph=True)
    four = Timer(bump, counters, device="cuda", cuda_graph=True, graph_calls=4)
    torch.cuda.synchronize()
    # per timer: the host-sync check's call on set 0, then a warm-up call per input set
    assert [c.item() for c in counters] == [4.0, 2.0]
    stats = four.run(3)  # graphs 0, 1, 0: four calls each, starting at their own input set, two per set
    torch.cuda.synchronize()
    assert [c.item() for c in counters] == [4.0 + 6, 2.0 + 6]
    assert stats.cuda_graph and stats.graph_calls == 4 and len(stats.times_ms) == 3
    per_call_one = sorted(one.run(9).times_ms)[4]
    per_call_four = sorted(four.run(9).times_ms)[4]
    assert 0.5 < per_call_four / per_call_one < 1.2  # per call, not per replay
    with pytest.raises(ValueError, match="graph_calls"):
        Timer(bump, counters, device="cuda", cuda_graph=True, graph_calls=0)


def test_graph_us_in_turn_refuses_a_negative_rest():
    with pytest.raises(ValueError, match=r"rest: expected >= 0 \(idle time over replay time\), got -1"):
        graph_us_in_turn([], rounds=1, rest=-1.0)
    with pytest.raises(ValueError, match="got nan"):
        graph_us_in_turn([], rounds=1, rest=float("nan"))


@pytest.mark.gpu
def test_graph_us_in_turn_rests_after_each_replay_in_proportion():
    """rest=2: after each replay the GPU idles twice the replay's time (the tuner's ``--rematch-rest``)."""

    def long_call():
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time

    graph, _ = capture_graph(long_call, calls=1, warmup=1)
    naps = []
    times = graph_us_in_turn([(graph, 1), (graph, 1)], rounds=3, rest=2.0, sleep=naps.append)
    assert len(naps) == 6  # 3 rounds x 2 graphs
    for nap in naps:
        assert 1.2 * min(times) * 1e-6 < nap < 2.8 * max(times) * 1e-6
    assert graph_us_in_turn([(graph, 1)], rounds=2, sleep=naps.append) and len(naps) == 6  # rest 0: no sleep
