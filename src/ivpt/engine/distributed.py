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
    """Seeded per-epoch order cut into global batches, shared out between processes.

    Training (``whole_batches=False``): each process takes its share of every global batch, so one
    process and n processes see the same global batches and results match at the same global batch
    size (up to floating-point reduction order). A global batch with fewer samples than processes
    (only ever the ragged last one) is skipped when there are several processes, since DDP needs a
    backward on every process. Evaluation (``whole_batches=True``): whole batches go round-robin to
    the processes; one that gets none only adds zeros to the summed metrics.
    """

    def __init__(self, size: int, batch_size: int, ctx: Dist, seed: int, shuffle: bool = True,
                 whole_batches: bool = False):
        self.size, self.batch_size, self.ctx = size, batch_size, ctx
        self.seed, self.shuffle, self.whole_batches = seed, shuffle, whole_batches
        self.epoch = 0
        self.start = 0  # global batches of the epoch already trained (a run resumed inside an epoch)
        self._cache: tuple[int, list[torch.Tensor]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1009 + self.epoch))
        else:
            order = torch.arange(self.size)
        batches = list(order.split(self.batch_size))
        if not self.whole_batches and self.ctx.world > 1:
            batches = [b for b in batches if len(b) >= self.ctx.world]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self):
        batches = self.global_batches()[self.start:]
        if self.whole_batches:
            yield from (b.tolist() for b in batches[self.ctx.rank::self.ctx.world])
        else:
            yield from (b[self.ctx.rank::self.ctx.world].tolist() for b in batches)

    def __len__(self) -> int:
        n = len(self.global_batches()) - self.start
        if self.whole_batches:
            return len(range(self.ctx.rank, n, self.ctx.world))
        return n
