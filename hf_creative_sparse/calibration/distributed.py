"""Calibration over several processes (``accelerate launch``, torchrun): the process group
from the launcher's environment, and the statistics of every pass added up with
``all_reduce`` so that every process ends with the same thresholds."""

from __future__ import annotations

import os
from typing import Any

import torch

def process_group(enabled: bool | None) -> Any:
    """torch.distributed when this run has several processes (initialised here from the
    launcher's environment when needed), else None."""
    if enabled is False:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        if enabled:
            raise RuntimeError("distributed=True but torch.distributed is not available")
        return None
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "MASTER_ADDR" not in os.environ:
            if enabled:
                raise RuntimeError("distributed=True but no process group is initialised and WORLD_SIZE/MASTER_ADDR "
                                   "are not set (launch with `accelerate launch` or torchrun)")
            return None
        use_nccl = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist if dist.get_world_size() > 1 else None


def all_reduce(dist: Any, tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """Sum (or max) float64 CPU tensors over the processes; returns new tensors."""
    if dist is None or not tensors:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors]).double()
    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    flat = flat.cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset: offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out
