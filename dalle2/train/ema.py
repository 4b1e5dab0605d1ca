"""Exponential moving average of the weights, sharded across ranks (safe under ZeRO-3).

Diffusion models sample from an EMA of their weights (Ho et al. 2020, appendix B; Nichol &
Dhariwal 2021). Under ZeRO-3 no rank holds a whole parameter, so each rank keeps the EMA of
its own partition: parameter p, flattened and padded to a multiple of the world size W, is
split into W equal slices and rank r averages slice r. That is exactly ZeRO-3's partition
(``param.ds_tensor``), so the update touches only local memory with no communication; under
ZeRO 0-2 (whole parameters on every rank) the rank takes the same slice, so the EMA costs 1/W
of the model per rank at every stage. :func:`consolidate` puts the slices back together, from
the per-rank files of a checkpoint (export) or from :meth:`ShardedEMA.gather` (sample grids).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def partition_size(numel: int, world_size: int) -> int:
    """Elements per rank of a parameter of ``numel`` elements (the last slice is zero-padded)."""
    return math.ceil(numel / world_size)


class ShardedEMA:
    """EMA of this rank's slice of every parameter, kept in float32."""

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], decay: float, rank: int = 0, world_size: int = 1):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.decay, self.rank, self.world_size = decay, rank, world_size
        self.params = dict(named_parameters)
        self.shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()}
        self.shards = {name: self._local_slice(name).float().clone() for name in self.params}

    def _local_slice(self, name: str) -> Tensor:
        """[partition] this rank's slice of parameter ``name`` as it is now."""
        param = self.params[name]
        size = partition_size(math.prod(self.shapes[name]), self.world_size)
        partition = getattr(param, "ds_tensor", None)  # ZeRO-3: the rank holds just its slice
        if partition is not None:
            local = partition.detach().reshape(-1)
            if local.numel() != size:
                raise RuntimeError(f"{name}: ZeRO-3 partition of {local.numel()} elements, expected {size}")
            return local
        flat = param.detach().reshape(-1)
        piece = flat[self.rank * size : (self.rank + 1) * size]
        return F.pad(piece, (0, size - piece.numel()))

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step``: warmed up as (1 + s) / (10 + s) so that the
        average forgets the random initialisation early in training (as TensorFlow's EMA with num_updates)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay_at(step)
        for name, shard in self.shards.items():
            shard.mul_(decay).add_(self._local_slice(name).float(), alpha=1 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's slices (what the rank saves in a checkpoint)."""
        return {name: shard.detach().cpu() for name, shard in self.shards.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shards):
            missing, unexpected = sorted(set(self.shards) - set(state)), sorted(set(state) - set(self.shards))
            raise ValueError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, shard in self.shards.items():
            if state[name].shape != shard.shape:
                raise ValueError(f"EMA slice {name}: {tuple(state[name].shape)} vs {tuple(shard.shape)} (another world size?)")
            shard.copy_(state[name])

    def layout(self) -> dict:
        """What :func:`consolidate` needs besides the slices (identical on every rank)."""
        return {"world_size": self.world_size, "shapes": {name: list(shape) for name, shape in self.shapes.items()}}

    @torch.no_grad()
    def gather(self, dst: int = 0, dtype: Optional[torch.dtype] = None) -> Optional[dict[str, Tensor]]:
        """Whole EMA parameters (float32, or ``dtype`` parameter by parameter so that no whole
        float32 copy is ever held; CPU) on rank ``dst``, None on the others. Collective."""
        if self.world_size == 1:
            full = consolidate([self.state_dict()], self.layout())
            return full if dtype is None else {name: value.to(dtype) for name, value in full.items()}
        full: dict[str, Tensor] = {}
        for name, shard in self.shards.items():
            pieces = [torch.empty_like(shard) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(shard, pieces, dst=dst)
            if pieces is not None:
                whole = torch.cat(pieces)[: math.prod(self.shapes[name])].reshape(self.shapes[name])
                full[name] = whole.to(device="cpu", dtype=dtype or whole.dtype)
        return full if self.rank == dst else None


def consolidate(shards: list[dict[str, Tensor]], layout: dict) -> dict[str, Tensor]:
    """Whole parameters from the slices of every rank (``shards[r]`` from rank r)."""
    if len(shards) != layout["world_size"]:
        raise ValueError(f"EMA of {layout['world_size']} ranks, got slices of {len(shards)}")
    full = {}
    for name, shape in layout["shapes"].items():
        numel = math.prod(shape)
        full[name] = torch.cat([shard[name].reshape(-1) for shard in shards])[:numel].reshape(shape).clone()
    return full
