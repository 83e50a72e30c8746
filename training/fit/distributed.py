"""Process-group setup for ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

A plain ``python -m training`` run is a world of one and never touches ``torch.distributed``, so
the same code path serves one process and many.

A process joins the group once (:func:`distributed_session`) and keeps it for all its training
stages: destroying the default group and creating it again reuses the same rendezvous keys in
torchrun's store, so a fast rank can read a slow peer's stale address and fail to connect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from models.network.nets import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and metrics."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over ranks (e.g. correct-count and total for accuracy)."""
        if not self.is_distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (one tiny all-reduce when distributed)."""
        if not self.is_distributed:
            return flag
        return self.all_reduce_sum([float(flag)])[0] == self.world_size

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        Under DDP each rank updates its running statistics from its own shard after the last
        forward of an epoch; evaluating with rank 0's makes the validation accuracy that of the
        weights rank 0 checkpoints.
        """
        if self.is_distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: each item on exactly one rank.

    For evaluation. ``DistributedSampler`` pads the shards to equal length by repeating items,
    which would count some validation images twice; summed over ranks, metrics over these shards
    equal a single process's.
    """

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = range(rank, length, num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """The order never changes (present for :class:`~training.data.datasets.SeededItems`)."""

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device_name: str) -> Iterator[DistributedContext]:
    """Join torchrun's process group for the block; leave it on exit only if this block joined it.

    Nested sessions (the pipeline around its training stages) share the outer one's group.
    """
    already_joined = dist.is_initialized()
    ctx = init_distributed(device_name)
    try:
        yield ctx
    finally:
        if not already_joined:
            shutdown_distributed()
