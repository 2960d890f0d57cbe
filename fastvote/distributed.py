"""torch.distributed as fastvote uses it: the engine users already run under
``torchrun``, never a home-made one. Every helper is a no-op in a single
process, so the same code path serves one process and many.

How work is split (see fastvote.prune, fastvote.cluster, fastvote.train):
  - passes over surrogate outputs (target votes, source class centroids,
    K-means statistics) read a contiguous shard of the rows per rank
    (:func:`shard`) and combine their sums with :func:`all_reduce_`: votes are
    integers and sums are float64, so the result is the single-process one;
  - training is DDP over FFCV loaders built with ``distributed=True``;
  - rank 0 writes files; the others wait where they need them.

    torchrun --nproc_per_node 2 -m fastvote.cli prune --source S --target T ...
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "active", "rank", "world_size", "is_main", "shard", "all_reduce_",
           "broadcast_object", "broadcast_buffers", "barrier", "main_first", "local_device", "shutdown"]


def _launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: Optional[str] = None) -> bool:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT in the environment), once: NCCL when this process uses a
    GPU, gloo otherwise. Returns whether more than one process takes part."""
    if active() or not _launched():
        return active()
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return active()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def resolve_device(device=None) -> torch.device:
    """The one default-device rule: `device` as given (checked: a CUDA device
    on a machine without one is an error, not a silent CPU run), else cuda
    when available, else cpu; under torchrun, this rank's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is invalid; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported; expected 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r}: this machine has no usable CUDA GPU; use device='cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={str(device)!r}: this machine has {count} CUDA GPU(s); expected cuda:0"
                             + (f"..cuda:{count - 1}" if count > 1 else ""))
    init_from_env(device)  # under torchrun: join the group (NCCL on GPUs, gloo on CPUs)
    return local_device(device)


def local_device(device) -> torch.device:
    """``device``, made this rank's GPU under NCCL ("cuda" -> "cuda:LOCAL_RANK")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard(num_rows: int) -> range:
    """This rank's contiguous share of ``num_rows`` rows (sizes differ by at most one)."""
    r, w = rank(), world_size()
    return range(num_rows * r // w, num_rows * (r + 1) // w)


def _in_place(collective, tensor: torch.Tensor) -> None:
    """Runs an in-place collective on ``tensor``; NCCL needs it on the GPU, so a
    CPU tensor makes the round trip."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        collective(moved)
        tensor.copy_(moved)
    else:
        collective(tensor)


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks, in place; returns it."""
    if active():
        _in_place(dist.all_reduce, tensor)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm statistics) on every rank, in place:
    DDP syncs them before each forward, so after the last one the ranks differ."""
    if not active():
        return
    for buffer in module.buffers():
        _in_place(lambda t: dist.broadcast(t, src), buffer)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leaves the process group (at the end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache file); the others run
    it after, when they find the file there on shared storage."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
