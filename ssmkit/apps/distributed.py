"""The processes of a run: single process, or DistributedDataParallel under `torchrun` (WORLD_SIZE set).

`Processes.from_env(device_option)` reads the rank, world size and device; `join()` creates the process
group (gloo on CPU, NCCL on CUDA) when there are several processes — called by the runner when a run
starts, never by a constructor. Only rank 0 writes files and prints; `on_main` runs a function there and
gives its result (or its failure) to every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ssmkit.errors import RunError

__all__ = ["Processes"]


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str = "auto") -> "Processes":
        """This process under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or alone; `device` is auto/cpu/cuda."""
        if "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        else:
            rank, world, local_rank = 0, 1, 0
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device")
        return cls(rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self) -> None:
        """Select the CUDA device and create the process group (once) when there are several processes."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            cuda = self.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)

    def broadcast(self, obj: Any) -> Any:
        """`obj` of rank 0, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and give its result to every rank; when it fails, every rank raises
        (rank 0 its own exception, the others a RunError naming it) instead of hanging."""
        result, error, failure = None, None, None
        if self.main:
            try:
                result = fn()
            except Exception as e:
                failure = e
                error = str(e) if isinstance(e, RunError) else f"rank 0 failed: {type(e).__name__}: {e}"
        result, error = self.broadcast((result, error))
        if failure is not None:
            raise failure
        if error is not None:
            raise RunError(error)
        return result
