"""Multi-process meta-training with the standard engine (`torchrun --nproc_per_node=N -m pipeline train ...`).

Every rank draws the same meta-batch (episodes are a pure function of their index), processes tasks
`rank, rank + N, ...`, and the meta-gradients are summed with one `all_reduce` after the outer backward (each
task's loss is already divided by the meta-batch size, so the sum is the meta-batch mean). No DDP wrapper: its
hooks do not mix with MAML's functional inner loop (learn2learn #170). gloo on CPU, NCCL on CUDA. Only rank 0
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size` processes (1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n_tasks: int) -> list[int]:
        """Indices of the meta-batch tasks this rank processes."""
        return list(range(self.rank, n_tasks, self.size))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when torchrun set `WORLD_SIZE > 1`; CUDA ranks get their local GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def all_reduce_grads(model: nn.Module, world: World) -> None:
    """Sum every parameter's `.grad` over ranks (missing grads count as zero), in one flat buffer."""
    if world.size <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few floats over ranks (for logging and validation)."""
    if world.size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_params(model: nn.Module, world: World) -> None:
    """Copy rank 0's weights to every rank (seeded builds agree already; this guards against drift)."""
    if world.size > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0)


def finish(world: World) -> None:
    """Leave the process group."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
