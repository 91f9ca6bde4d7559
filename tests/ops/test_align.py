"""moe_align: exact equality with the sort-based reference, and the layout's invariants."""

import pytest
import torch
import triton
import triton.language as tl

from tilemoe.ops import align as align_module
from tilemoe.ops._kernels._align import _sorted_by_count
from tilemoe.ops.align import align_capacity, align_chunk, moe_align, moe_align_torch, moe_align_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_invariants(al, topk_ids, num_experts, block_m):
    flat = topk_ids.reshape(-1).long().cpu()
    num_slots = flat.numel()
    sorted_ids = al.sorted_ids.cpu().long()
    counts = torch.zeros(num_experts, dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))
    assert torch.equal(al.counts.cpu().long(), counts)
    assert int(al.counts.sum()) == num_slots  # offsets sum to T*K
    padded = (counts + block_m - 1) // block_m * block_m
    assert (
        int(al.num_padded) == int(padded.sum()) <= sorted_ids.numel() == align_capacity(num_slots, num_experts, block_m)
    )
    real = sorted_ids[sorted_ids < num_slots]
    assert torch.equal(torch.sort(real)[0], torch.arange(num_slots))  # a bijection onto the slots
    assert bool((sorted_ids[sorted_ids >= num_slots] == num_slots).all())
    expert_ids = al.expert_ids.cpu().long()
    used = int(al.num_padded) // block_m
    for block in range(used):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        # real rows first, padding after: the split-tail GEMMs read one row to tell a half-padding block
        real_rows = int((rows < num_slots).sum())
        assert bool((rows[:real_rows] < num_slots).all()) and bool((rows[real_rows:] == num_slots).all())
        rows = rows[rows < num_slots]
        assert bool((flat[rows] == expert_ids[block]).all())
        assert bool((rows[1:] > rows[:-1]).all())  # slot order inside an expert (stable)
    assert bool((expert_ids[used:] == num_experts).all())
    # expert_starts: each expert's first block (the blocks are sorted by expert), then the blocks in use
    starts = al.expert_starts.cpu().long()
    assert starts.shape == (num_experts + 1,) and int(starts[0]) == 0 and int(starts[-1]) == used
    assert torch.equal(starts[1:] - starts[:-1], padded // block_m)
    for expert in range(num_experts):
        assert bool((expert_ids[starts[expert] : starts[expert + 1]] == expert).all())


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [(0, 2, 6, 16), (1, 1, 6, 16), (7, 2, 6, 16), (64, 8, 10, 32), (300, 4, 7, 16), (5, 3, 200, 16)],
)
def test_align_matches_reference(num_tokens, top_k, num_experts, block_m, generator):
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    topk_ids = torch.sort(scores, dim=-1, descending=True)[1][:, :top_k].to(DEVICE, torch.int32)
    got = moe_align(topk_ids, num_experts, block_m)
    ref = moe_align_torch(topk_ids, num_experts, block_m)
    for name in ("sorted_ids", "expert_ids", "counts", "num_padded", "expert_starts"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name).cpu()), name
    _check_invariants(got, topk_ids, num_experts, block_m)


def test_align_one_expert_takes_every_token():
    topk_ids = torch.full((33, 1), 3, dtype=torch.int32, device=DEVICE)
    got = moe_align(topk_ids, 5, 16)
    _check_invariants(got, topk_ids, 5, 16)
    assert got.counts.tolist() == [0, 0, 0, 33, 0]
    assert int(got.num_padded) == 48


def _assert_same(got, ref):
    for name in ("sorted_ids", "expert_ids", "counts", "num_padded", "expert_starts"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name).cpu()), name


def _random_ids(num_tokens, top_k, num_experts, generator, dtype=torch.int32):
    """Distinct experts per token (as a router picks them)."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    return torch.sort(scores, dim=-1, descending=True)[1][:, :top_k].to(DEVICE, dtype)


@pytest.mark.parametrize("num_slots", [512, 513])  # last one-program size, first multi-program size
def test_align_threshold_paths_match_reference(num_slots, monkeypatch, generator):
    # the threshold raised so both paths run around S = 512 (the multi-program one: 5 chunks of 128 at S = 513)
    monkeypatch.setattr(align_module, "ONE_PROGRAM_MAX_SLOTS", 512)
    calls = []
    monkeypatch.setattr(
        align_module, "moe_align_triton", lambda *a, **kw: calls.append(1) or moe_align_triton(*a, **kw)
    )
    topk_ids = _random_ids(num_slots, 1, 10, generator)
    got = moe_align(topk_ids, 10, 16)
    assert len(calls) == (num_slots > 512)
    _assert_same(got, moe_align_torch(topk_ids, 10, 16))
    _check_invariants(got, topk_ids, 10, 16)


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m", "chunk"),
    [
        (300, 4, 7, 16, 64),  # 19 chunks, the last one partial
        (150, 8, 160, 32, 64),  # E not a power of two, > 128 (SUB = 32 tiles)
        (100, 3, 3, 256, 64),  # E = 3, the largest block_m
        (40, 8, 384, 16, 64),  # E = 384 (kimi-k2): most experts get 0 or 1 slot
        (1, 2, 6, 16, 64),  # one partial chunk
        (64, 4, 16, 64, 256),  # exactly one full chunk
    ],
)
@pytest.mark.parametrize("fused_scan", [False, True])  # the scan launch, or the scatter programs summing hist
def test_align_multi_program_matches_reference(num_tokens, top_k, num_experts, block_m, chunk, fused_scan, generator):
    topk_ids = _random_ids(num_tokens, top_k, num_experts, generator)
    got = moe_align_triton(topk_ids, num_experts, block_m, chunk=chunk, fused_scan=fused_scan)
    _assert_same(got, moe_align_torch(topk_ids, num_experts, block_m))
    _check_invariants(got, topk_ids, num_experts, block_m)


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m", "chunk"),
    [(150, 8, 160, 32, 128), (250, 8, 128, 64, 512), (400, 6, 64, 16, 256)],
)
@pytest.mark.parametrize("fused_scan", [False, True])
def test_align_large_chunks_match_reference(num_tokens, top_k, num_experts, block_m, chunk, fused_scan, generator):
    # the scatter sorts a whole chunk (tl.sort of CHUNK keys): chunks of 128-512 slots, the last one partial
    topk_ids = _random_ids(num_tokens, top_k, num_experts, generator)
    got = moe_align_triton(topk_ids, num_experts, block_m, chunk=chunk, fused_scan=fused_scan)
    _assert_same(got, moe_align_torch(topk_ids, num_experts, block_m))
    _check_invariants(got, topk_ids, num_experts, block_m)


@triton.jit
def _both_sorts(keys_ptr, by_sort_ptr, by_count_ptr, N: tl.constexpr):
    lanes = tl.arange(0, N)
    keys = tl.load(keys_ptr + lanes)
    tl.store(by_sort_ptr + lanes, tl.sort(keys))
    tl.store(by_count_ptr + lanes, _sorted_by_count(keys, lanes))


def test_sorted_by_count_is_tl_sort(generator):
    # the interpreter's stand-in for tl.sort in the scatter (SORT_BY_COUNT) orders distinct keys as tl.sort does
    ids = torch.randint(0, 9, (64,), generator=generator, dtype=torch.int32)
    keys = (ids * 64 + torch.randperm(64, generator=generator, dtype=torch.int32)).to(DEVICE)  # distinct, shuffled
    by_sort, by_count = torch.full_like(keys, -1), torch.full_like(keys, -1)
    _both_sorts[(1,)](keys, by_sort, by_count, N=64)
    assert torch.equal(by_sort.cpu(), torch.sort(keys.cpu())[0]) and torch.equal(by_count.cpu(), by_sort.cpu())


def test_align_chunk_by_slots():
    # 64 slots a program up to S = 4096, 128 to 16384, 256 below 131072, then 512 (H100 timings in align.py)
    sizes = (129, 4096, 4097, 16384, 16385, 131071, 131072)
    assert [align_chunk(s) for s in sizes] == [64, 64, 128, 128, 256, 256, 512]


def test_align_multi_program_skewed_and_int64(generator):
    # int64 ids; one expert takes every slot of the first chunks, odd experts get none
    ids = 2 * torch.randint(0, 6, (160, 4), generator=generator)
    ids[:40] = 4
    topk_ids = ids.to(DEVICE, torch.int64)
    for fused_scan in (False, True):
        got = moe_align_triton(topk_ids, 13, 32, chunk=64, fused_scan=fused_scan)
        _assert_same(got, moe_align_torch(topk_ids, 13, 32))
        _check_invariants(got, topk_ids, 13, 32)
        assert all(c == 0 for c in got.counts.tolist()[1::2])


def test_align_multi_program_one_expert_takes_every_slot():
    topk_ids = torch.full((700, 1), 5, dtype=torch.int32, device=DEVICE)
    got = moe_align_triton(topk_ids, 8, 64, chunk=128)
    _assert_same(got, moe_align_torch(topk_ids, 8, 64))
    assert int(got.num_padded) == 704


def test_align_multi_program_zero_tokens():
    topk_ids = torch.empty((0, 8), dtype=torch.int32, device=DEVICE)
    got = moe_align_triton(topk_ids, 128, 64)
    _assert_same(got, moe_align_torch(topk_ids, 128, 64))
    assert int(got.num_padded) == 0 and got.sorted_ids.numel() == 0


def _assert_bad_ids_dropped(got, num_slots, bad_slots, num_experts, block_m):
    """Slots whose id is outside [0, E) are counted nowhere and never written; the layout of the others holds."""
    assert int(got.counts.sum()) == num_slots - len(bad_slots)
    sorted_ids = got.sorted_ids.cpu()
    assert not any(bool((sorted_ids == slot).any()) for slot in bad_slots)
    assert int((sorted_ids < num_slots).sum()) == num_slots - len(bad_slots)
    padded = (got.counts.cpu().long() + block_m - 1) // block_m * block_m
    assert int(got.num_padded) == int(padded.sum())
    starts = got.expert_starts.cpu().long()
    assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0) // block_m]))


def test_align_multi_program_ids_out_of_range_are_dropped(generator):
    # documented behaviour: a slot whose id is outside [0, E) is counted nowhere and never written
    topk_ids = _random_ids(50, 3, 9, generator)
    topk_ids[3, 1], topk_ids[40, 0] = -1, 9
    for fused_scan in (False, True):
        got = moe_align_triton(topk_ids, 9, 16, chunk=64, fused_scan=fused_scan)
        _assert_bad_ids_dropped(got, 150, [3 * 3 + 1, 40 * 3], 9, 16)


def test_align_one_program_ids_out_of_range_are_dropped(generator):
    # the decode-sized path too (S <= 128): ids E..BLOCK_E-1 made phantom experts there, a negative one overwrote
    # sorted_ids[rank] (found in review, session 13)
    topk_ids = _random_ids(20, 3, 9, generator)
    topk_ids[2, 0], topk_ids[5, 2], topk_ids[11, 1] = 9, 12, -1
    got = moe_align(topk_ids, 9, 16)
    _assert_bad_ids_dropped(got, 60, [2 * 3, 5 * 3 + 2, 11 * 3 + 1], 9, 16)


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "chunk"),
    [
        (0, 2, 6, None),  # T = 0: the torch path
        (20, 2, 6, None),  # S = 40: the one-program kernel
        (300, 4, 7, None),  # the scatter programs, chunks of 64
        (300, 4, 7, 256),  # 5 chunks of 256: 5 shares
        (150, 8, 160, 128),  # E > 128
    ],
)
@pytest.mark.parametrize(
    ("shape", "dtype"), [((300, 41), torch.float16), ((7, 3), torch.float32), ((0, 5), torch.bfloat16)]
)
def test_align_fills_zeros(num_tokens, top_k, num_experts, chunk, shape, dtype, generator):
    # the atomic combine's output cleared by the align (KernelConfig.align_clears_out): poisoned first, so an element
    # no program stored fails; an odd size leaves the last store part-masked, and the alignment itself is unchanged
    topk_ids = _random_ids(num_tokens, top_k, num_experts, generator)
    zeros = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    if chunk is None:
        got = moe_align(topk_ids, num_experts, 16, zeros=zeros)
    else:
        got = moe_align_triton(topk_ids, num_experts, 16, chunk=chunk, zeros=zeros)
    assert bool((zeros == 0).all())
    _assert_same(got, moe_align_torch(topk_ids, num_experts, 16))


def test_align_zeros_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="zeros"):
        moe_align(ids, 4, 16, zeros=[0.0])
    with pytest.raises(ValueError, match="zeros: expected a contiguous"):
        moe_align(ids, 4, 16, zeros=torch.empty(4, 6, device=DEVICE).t())
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="zeros: expected a tensor on"):
            moe_align(ids, 4, 16, zeros=torch.empty(4))


def test_align_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_m"):
        moe_align(ids, 4, 24)
    with pytest.raises(TypeError, match="topk_ids"):
        moe_align(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        moe_align(ids, 0, 16)
    with pytest.raises(ValueError, match="chunk"):
        moe_align_triton(ids, 4, 16, chunk=96)
    with pytest.raises(TypeError, match="fused_scan"):
        moe_align_triton(ids, 4, 16, fused_scan="yes")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [(16384, 8, 128, 64), (4097, 8, 128, 16), (8192, 8, 384, 128), (3000, 6, 160, 32), (1024, 2, 3, 256)],
)
def test_align_large_matches_reference_gpu(num_tokens, top_k, num_experts, block_m, generator):
    topk_ids = _random_ids(num_tokens, top_k, num_experts, generator)
    got = moe_align(topk_ids, num_experts, block_m)
    _assert_same(got, moe_align_torch(topk_ids, num_experts, block_m))
    _check_invariants(got, topk_ids, num_experts, block_m)


@pytest.mark.gpu
def test_align_multi_program_cuda_graph_gpu(generator):
    topk_ids = _random_ids(4096, 8, 128, generator)
    static = topk_ids.clone()
    moe_align_triton(static, 128, 64)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = moe_align_triton(static, 128, 64)
    for _ in range(2):  # new routings replayed through the captured launches
        static.copy_(_random_ids(4096, 8, 128, generator))
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(got, moe_align_torch(static, 128, 64))


def align_timings(
    num_slots_list=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072), num_experts=128, top_k=8, block_m=64
):
    """Median microseconds (CUDA-graph replays) of each align path per S; the one-program path up to S = 16384.

    A helper for choosing ``ONE_PROGRAM_MAX_SLOTS`` and ``ALIGN_CHUNK``: run
    ``pytest tests/ops/test_align.py -m gpu -k timings -s`` on the GPU.
    """
    from tilemoe.bench.timing import measure

    generator = torch.Generator().manual_seed(0)
    rows = []
    for num_slots in num_slots_list:
        topk_ids = _random_ids(num_slots // top_k, top_k, num_experts, generator)
        paths = {"torch": moe_align_torch, "multi": moe_align_triton}
        for chunk in (128, 512, 1024):
            paths[f"multi_c{chunk}"] = lambda ids, e, bm, c=chunk: moe_align_triton(ids, e, bm, chunk=c)
        if num_slots <= 16384:
            paths["one_program"] = align_module._moe_align_one_program
        row = {"S": num_slots}
        for name, fn in paths.items():
            _assert_same(fn(topk_ids, num_experts, block_m), moe_align_torch(topk_ids, num_experts, block_m))
            stats = measure(
                lambda ids, fn=fn: fn(ids, num_experts, block_m),
                [topk_ids],
                warmup=10,
                iters=100,
                device="cuda",
                cuda_graph=True,
            )
            row[name] = round(stats.p50 * 1000, 1)
        rows.append(row)
    return rows


@pytest.mark.gpu
def test_align_timings_gpu():
    for num_experts in (128, 384):
        for row in align_timings(num_experts=num_experts):
            print(f"E={num_experts} align us (p50, graph replays):", row)
