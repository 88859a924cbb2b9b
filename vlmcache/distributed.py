"""Work on several processes under torchrun: join the group, share rank 0's refusal, wait for every rank; for
training also check every rank reads the same cache, gather embeddings for the contrastive loss over the
global batch, sum gradients. `vlmcache extract` uses the first three.

The loss is computed on every rank over the *global* batch (all ranks' embeddings, gathered), as
open_clip's `gather_features` does: the local part of the gathered tensor is the rank's own
embeddings, with their autograd graph; the other ranks' parts are copies without gradient. Each rank's
backward pass therefore reaches only its own embeddings, and the sum over ranks of the projector
gradients is exactly the gradient of the global-batch loss (all_reduce SUM). The loss module's own
parameters (temperature, bias) see the whole loss on every rank, so their gradient is the same
everywhere and is averaged instead. So N ranks × batch B/N take the same steps as one process with
batch B (tested on gloo within float tolerance), gradient clipping included.

A rank that dies makes the others' next collective fail (the connection closes, or the group timeout
passes): they stop with one line naming what happened and what is kept (`recovery`: training's last
checkpoint by default), never wait forever.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from vlmcache.errors import VlmcacheError

TIMEOUT_SECONDS = float(os.environ.get("VLMCACHE_DIST_TIMEOUT", "600"))
TRAIN_RECOVERY = "the last checkpoint is kept: fix the cause and rerun with --resume"


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins torchrun's process group (nccl on CUDA, gloo on CPU) when
    WORLD_SIZE > 1. On CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
        except (RuntimeError, ValueError) as error:
            raise VlmcacheError(f"torchrun: could not join the process group ({str(error).splitlines()[0]}); check "
                                "MASTER_ADDR/MASTER_PORT and that every rank was started") from None
    return (dist.get_rank(), dist.get_world_size(), device) if world > 1 else (0, 1, device)


def _collective(what: str, call, *args, recovery: str = TRAIN_RECOVERY):
    """Run one collective; a lost rank (closed connection, timeout) becomes one line instead of a traceback,
    ending with `recovery`: what was kept and how to go on."""
    try:
        return call(*args)
    except RuntimeError as error:
        raise VlmcacheError(f"rank {dist.get_rank()}: {what} failed, another rank stopped or died "
                            f"({str(error).splitlines()[0][:160]}); {recovery}") from None


def check_same_inputs(description: dict, world: int) -> None:
    """Refuse, before training, ranks whose caches or options differ (compares a hash of `description`)."""
    if world == 1:
        return
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * world
    _collective("comparing caches", dist.all_gather_object, digests, digest)
    if len(set(digests)) > 1:
        odd = [rank for rank, value in enumerate(digests) if value != digests[0]]
        raise VlmcacheError(f"torchrun: ranks {', '.join(map(str, odd))} see a different cache or options than rank 0 "
                            f"(hash {digests[odd[0]][:12]} vs {digests[0][:12]}); give every rank the same cache "
                            "(same path on a shared file system, same contents) and options")


def gather(local: torch.Tensor, world: int) -> torch.Tensor:
    """All ranks' rows of `local`, in rank order; this rank's rows keep their gradient."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    _collective("gathering embeddings", dist.all_gather, parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def reduce_gradients(model: nn.Module, loss_module: nn.Module, world: int) -> None:
    """Sum the projectors' gradients over ranks and average the loss module's (see the module docstring)."""
    if world == 1:
        return
    parameters = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])  # one collective, not one per tensor
    _collective("summing gradients", dist.all_reduce, flat)
    shared = {id(p) for p in loss_module.parameters()}
    offset = 0
    for p in parameters:
        part = flat[offset:offset + p.numel()].view_as(p.grad)
        p.grad.copy_(part / world if id(p) in shared else part)
        offset += p.numel()


def share_error(message: str | None, world: int, recovery: str = TRAIN_RECOVERY) -> None:
    """Rank 0's refusal (or None) raised on every rank, so no rank waits for one that stopped."""
    if world > 1:
        box = [message]
        _collective("sharing rank 0's checks", dist.broadcast_object_list, box, 0, recovery=recovery)
        message = box[0]
    if message:
        raise VlmcacheError(message)


def barrier(world: int, what: str, recovery: str = TRAIN_RECOVERY) -> None:
    """Wait until every rank gets here; `what` names the wait in the one line a lost rank causes."""
    if world > 1:
        _collective(what, dist.barrier, recovery=recovery)


def finish(world: int) -> None:
    """Leave the process group (at the end of a run)."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless this process is a torchrun rank other than 0 (only rank 0 prints and writes shared files)."""
    return int(os.environ.get("RANK", "0")) == 0
