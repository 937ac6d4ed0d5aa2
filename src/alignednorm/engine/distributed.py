"""Data-parallel training of one run with ``torchrun`` (one process per GPU, or gloo on CPU).

Only the prompt parameters learn, so each step averages their gradients across processes
(what DistributedDataParallel does, without wrapping a module whose ``forward`` is not the
training step). Every process draws the same seeded batch order and takes its slice of each
global batch, so a run with N processes and global batch B follows the same optimisation path
as one process with batch B (exactly, for losses that are batch means and data without random
augmentation). Process 0 alone writes checkpoints, logs and results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device | None:
    """Join the process group ``torchrun`` describes in the environment; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the processes."""
    if not is_distributed():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class ShardedBatches:
    """Wrap a batch sampler: each process keeps its contiguous slice of every global batch."""

    def __init__(self, batch_sampler, world: int, rank_: int):
        self.batch_sampler, self.world, self.rank = batch_sampler, world, rank_

    def __iter__(self):
        for batch in self.batch_sampler:
            share = len(batch) // self.world
            yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
