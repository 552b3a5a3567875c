"""Data parallel training under a launcher: torchrun, or `accelerate launch` (it sets the same
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables).

One process needs no launcher and no process group. Under N processes each step's global batch
is split into N x grad_accum micro-batch "shards" (per-process batch each): rank r runs shards
r * grad_accum .. r * grad_accum + grad_accum - 1, so a step is the same computation whatever
the split between processes and accumulation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and saves."""
        return self.rank == 0


def launched_ranks() -> Ranks:
    """The ranks a launcher's environment gives (one process when there is none)."""
    env = os.environ
    return Ranks(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def current_ranks() -> Ranks:
    """The initialized process group's ranks, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launched_ranks().local_rank)


def init_distributed() -> Ranks:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU); one process: nothing."""
    ranks = launched_ranks()
    if ranks.world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group; wait: first wait for every rank (rank 0 may still be saving).
    A failed rank does not wait: the others may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def process_device(ranks: Ranks) -> torch.device:
    """This process's device: its local GPU, else the CPU."""
    return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the processes (the global batch's figure); one process: as is."""
    ranks = current_ranks()
    if ranks.world_size == 1:
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(values, (packed / ranks.world_size).tolist(), strict=True))


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of one micro-batch shard's routing draws: a pure function of (seed, step,
    shard), so a resumed or re-split run draws the same selections."""
    digest = hashlib.blake2b(f"{seed}/{step}/{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
