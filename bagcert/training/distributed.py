"""torch.distributed for training: the process's place (:func:`distributed_env`), leaving the process group
(:func:`leave_process_group`), the ``sync_bn`` check, and the decisions every rank must take alike (rank 0's
numbers, checkpoint-and-stop flags).

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP (gloo on CPU, nccl on CUDA) and each rank takes
every WORLD_SIZE-th sample of the global batch; only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import TrainConfig
from .errors import TrainingError
from .state import StopSignals

__all__ = ["distributed_env", "check_sync_bn", "leave_process_group"]


def distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def check_sync_bn(cfg: "TrainConfig", world: int, device_type: str) -> str | None:
    """Check ``cfg.sync_bn`` for a run of ``world`` processes on ``device_type``; returns a note for the log or None.

    Raises :class:`TrainingError` for ``sync_bn`` under DDP off CUDA: torch's DistributedDataParallel refuses
    ``SyncBatchNorm`` in CPU modules ("SyncBatchNorm layers only work with GPU modules", torch 2.14, gloo). In one
    process there is nothing to synchronise: the note says so."""
    if not cfg.sync_bn:
        return None
    if world > 1 and device_type != "cuda":
        raise TrainingError(f"sync_bn needs CUDA: torch's DistributedDataParallel refuses SyncBatchNorm on {device_type} "
                            "(gloo); train without --sync-bn (each process normalises with its own share of the batch), "
                            "or on GPUs")
    if world == 1:
        return "--sync-bn: one process, nothing to synchronise (batch norm already sees the whole batch)"
    return None


def leave_process_group(failed: bool = False) -> None:
    """End a torch.distributed run: every rank leaves the process group together (a rank that exits early
    aborts gloo's peers). Does nothing outside torch.distributed.

    ``failed=True``: the run is ending with an error or a signal (torchrun stops the other ranks with SIGTERM
    when one dies). Then this rank leaves without waiting for the others: a peer may be gone, and the barrier
    would end in gloo's "Connection closed by peer" traceback after the run's own one-line message."""
    if dist.is_available() and dist.is_initialized():
        if failed:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the run's own error is what the user needs to see
                pass
            return
        dist.barrier()
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock readings cover it (the loop itself never syncs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _from_rank0(values: list, world: int) -> list:
    """Rank 0's float ``values`` on every rank (decisions every rank must take alike)."""
    if world > 1:
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, 0)
        values = t.tolist()
    return values


def _checkpoint_and_stop(checkpoint_due: bool, stop: StopSignals, world: int) -> tuple:
    """(checkpoint now?, signal number or 0), the same on every rank: one all_reduce (max) of rank 0's checkpoint
    clock (other ranks pass False) and of each rank's received signal."""
    flags = torch.tensor([int(bool(checkpoint_due)), int(stop.signum or 0)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1])
