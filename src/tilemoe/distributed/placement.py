"""ExpertPlacement: which expert-parallel rank owns which of the E routed experts.

Contiguous by default (rank r owns a run of experts; when E is not a multiple of ep_size the first E % ep_size
ranks own one more), or any explicit map ``owner[e] = rank``. Within a rank, its experts keep their global order:
local index = position of the expert among the ones that rank owns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """owner[e] is the expert-parallel rank holding expert e (len(owner) = E, every value in [0, ep_size))."""

    ep_size: int
    owner: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise ValueError(f"ExpertPlacement.ep_size: expected a positive int, got {self.ep_size!r}")
        if len(self.owner) == 0:
            raise ValueError("ExpertPlacement.owner: expected one rank per expert, got an empty map")
        bad = [(e, r) for e, r in enumerate(self.owner) if not isinstance(r, int) or not 0 <= r < self.ep_size]
        if bad:
            e, r = bad[0]
            raise ValueError(f"ExpertPlacement.owner: expected ranks in [0, {self.ep_size}), got owner[{e}] = {r!r}")

    # ------------------------------------------------------------ constructors
    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int) -> ExpertPlacement:
        """Runs of experts per rank; the first ``num_experts % ep_size`` ranks own one expert more."""
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size: expected a positive int, got {ep_size!r}")
        base, extra = divmod(num_experts, ep_size)
        owner: list[int] = []
        for rank in range(ep_size):
            owner += [rank] * (base + (1 if rank < extra else 0))
        return cls(ep_size=ep_size, owner=tuple(owner))

    @classmethod
    def from_map(cls, owner: Sequence[int] | torch.Tensor, ep_size: int) -> ExpertPlacement:
        """An explicit map: ``owner[e]`` = rank of expert e (list or 1-D integer tensor)."""
        if isinstance(owner, torch.Tensor):
            if owner.dim() != 1 or owner.dtype.is_floating_point:
                raise ValueError(f"owner: expected a 1-D integer tensor, got {owner.dtype} {list(owner.shape)}")
            owner = owner.tolist()
        return cls(ep_size=ep_size, owner=tuple(int(r) for r in owner))

    # ------------------------------------------------------------ queries
    @property
    def num_experts(self) -> int:
        return len(self.owner)

    def experts_of(self, rank: int) -> list[int]:
        """Global ids of the experts ``rank`` owns, in increasing order (their local order)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank: expected 0 <= rank < {self.ep_size}, got {rank}")
        return [e for e, r in enumerate(self.owner) if r == rank]

    def num_local(self, rank: int) -> int:
        return len(self.experts_of(rank))

    @property
    def max_local(self) -> int:
        return max(self.num_local(r) for r in range(self.ep_size))

    def owner_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: owner rank of each expert."""
        return torch.tensor(self.owner, dtype=torch.int64, device=device)

    def local_index_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] int64: index of each expert among its owner's experts."""
        seen = [0] * self.ep_size
        index = []
        for r in self.owner:
            index.append(seen[r])
            seen[r] += 1
        return torch.tensor(index, dtype=torch.int64, device=device)

    def describe(self) -> str:
        return ", ".join(f"rank {r}: {self.experts_of(r)}" for r in range(self.ep_size))
