"""moe_align: exact equality with the sort-based reference, and the layout's invariants."""

import pytest
import torch

from tilemoe.ops.align import align_capacity, moe_align, moe_align_torch

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
        rows = rows[rows < num_slots]
        assert bool((flat[rows] == expert_ids[block]).all())
        assert bool((rows[1:] > rows[:-1]).all())  # slot order inside an expert (stable)
    assert bool((expert_ids[used:] == num_experts).all())


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [(0, 2, 6, 16), (1, 1, 6, 16), (7, 2, 6, 16), (64, 8, 10, 32), (300, 4, 7, 16), (5, 3, 200, 16)],
)
def test_align_matches_reference(num_tokens, top_k, num_experts, block_m, generator):
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    topk_ids = torch.sort(scores, dim=-1, descending=True)[1][:, :top_k].to(DEVICE, torch.int32)
    got = moe_align(topk_ids, num_experts, block_m)
    ref = moe_align_torch(topk_ids, num_experts, block_m)
    for name in ("sorted_ids", "expert_ids", "counts", "num_padded"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name).cpu()), name
    _check_invariants(got, topk_ids, num_experts, block_m)


def test_align_one_expert_takes_every_token():
    topk_ids = torch.full((33, 1), 3, dtype=torch.int32, device=DEVICE)
    got = moe_align(topk_ids, 5, 16)
    _check_invariants(got, topk_ids, 5, 16)
    assert got.counts.tolist() == [0, 0, 0, 33, 0]
    assert int(got.num_padded) == 48


def test_align_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_m"):
        moe_align(ids, 4, 24)
    with pytest.raises(TypeError, match="topk_ids"):
        moe_align(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        moe_align(ids, 0, 16)
