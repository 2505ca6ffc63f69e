"""PyTorch's own distributed engine (torchrun + DDP): process group, sharding, metric reduction."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float], device) -> list[float]:
        """Sum scalars over processes (metrics are reduced as sums of counts, then divided)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self):
        if self.active:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(ctx: Dist) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler:
    """Seeded per-epoch order cut into global batches; each process takes its share of every batch.

    One process and n processes see the same global batches, so results match at the same global
    batch size (up to floating-point reduction order).
    """

    def __init__(self, size: int, batch_size: int, ctx: Dist, seed: int, shuffle: bool = True,
                 drop_last: bool = False):
        self.size, self.batch_size, self.ctx = size, batch_size, ctx
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1009 + self.epoch))
        else:
            order = torch.arange(self.size)
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self):
        for batch in self.global_batches():
            yield batch[self.ctx.rank::self.ctx.world].tolist()

    def __len__(self) -> int:
        return len(self.global_batches())
