"""Evaluation on many processes with ``torch.distributed`` (started by ``torchrun``).

``torchrun --nproc-per-node N [--nnodes M ...] -m sed_fast eval ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` then joins the process
group (NCCL for CUDA devices, gloo for CPU). Rank r evaluates images r, r + W, r + 2W, ... of the
sorted list; the confusion matrices are summed with an all-reduce (int64, exact) and only rank 0
writes files. Without those variables everything runs in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

__all__ = ["Context", "setup", "shard"]


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: a single process, no process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place; also returned)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, value: Any) -> List[Any]:
        if not self.distributed:
            return [value]
        gathered: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> Context:
    """Join the process group when started by torchrun with more than one process.

    ``device_type``: ``"cuda"`` (NCCL; each process uses ``cuda:LOCAL_RANK``) or ``"cpu"`` (gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: run in a single process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local_rank)} if device_type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shard(indices: List[int], rank: int, world_size: int) -> List[int]:
    """Rank ``rank``'s part: positions rank, rank + W, ... of ``indices``."""
    return indices[rank::world_size]
