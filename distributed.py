"""Process-group plumbing for ``torchrun``: one training job spread over N processes (DistributedDataParallel).

    torchrun --nproc_per_node=2 main.py train --members torch ...

``torchrun`` starts N copies of the command with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. ``init_from_env``
joins them into one process group (NCCL on GPU, gloo on CPU); without those
variables every helper here is the single-process identity, so a member
written against these helpers runs unchanged under ``python main.py``. What a
torch member needs, in a few lines::

    import distributed
    model = distributed.wrap_model(model, device)          # SyncBatchNorm + DDP in a process group
    sampler = distributed.sampler(n_train, seed)           # this rank's share of one global order
    loader = DataLoader(range(n_train), batch_size=distributed.local_batch(batch), sampler=sampler)
    ... sampler.set_epoch(epoch) ...
    if distributed.is_main(): ...                          # validation, writing files
    proba = distributed.broadcast_object(proba)            # every rank leaves with rank 0's result

Batch norm: each rank normalises with the statistics of the whole global batch
(torch's ``SyncBatchNorm`` on GPU; ``AllReduceBatchNorm`` below on CPU, where
torch's has no kernel), so N ranks of ``batch / N`` samples train the network
that one process trains with ``batch`` samples in the same order.

Imports only the standard library at module level (torch lazily): the scaffold
imports this module and a LightGBM-only environment has no torch.
"""

from __future__ import annotations

import datetime
import inspect
import itertools
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """torchrun (or ``torch.distributed.run``) started this process: its rendezvous variables are set."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 without torchrun): known before the process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def _dist() -> Any:
    import torch.distributed as dist  # lazily: torch is optional for the scaffold

    return dist


def is_initialized() -> bool:
    """A process group exists (it can only once torch.distributed has been imported)."""
    if "torch.distributed" not in sys.modules:
        return False
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def world_size() -> int:
    """Processes in the joined process group; 1 without one."""
    return int(_dist().get_world_size()) if is_initialized() else 1


def rank() -> int:
    return int(_dist().get_rank()) if is_initialized() else 0


def is_distributed() -> bool:
    """True once this process has joined a torchrun job's process group (even a group of one process:
    ``torchrun --nproc_per_node=1`` runs the whole DDP path on one GPU)."""
    return is_initialized()


def is_main() -> bool:
    """Rank 0: the one process that writes bundles, OOF, state and logs to files."""
    return rank() == 0


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(timeout_min: int = 60) -> bool:
    """Join torchrun's process group; True when this call created it (then ``shutdown`` it), else False.

    A no-op without torchrun's variables or when the group already exists. On GPU each rank takes the
    device ``LOCAL_RANK`` before the group is made (NCCL binds to the current device).
    """
    if not launched_by_torchrun() or is_initialized():
        return False
    import torch

    dist = _dist()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    name = backend()
    dist.init_process_group(backend=name, timeout=datetime.timedelta(minutes=timeout_min))
    log.info("distributed: rank %d of %d (local rank %d), backend %s", rank(), world_size(), local_rank(), name)
    return True


def shutdown() -> None:
    if is_initialized():
        _dist().destroy_process_group()


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist = _dist()
        if backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; the others' ``obj`` is ignored); identity when alone."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few floats (e.g. loss sums and counts for the log)."""
    if not is_distributed():
        return list(values)
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _dist().all_reduce(t)
    return [float(v) for v in t.cpu()]


def local_batch(global_batch: int) -> int:
    """Per-rank batch so that the ranks together see ``global_batch`` samples a step (logged when it is not exact)."""
    n = world_size()
    per_rank = max(1, global_batch // n)
    if per_rank * n != global_batch:
        log.warning(
            "distributed: batch %d is not a multiple of %d ranks: global batch %d", global_batch, n, per_rank * n
        )
    return per_rank


def sampler(n: int, seed: int, shuffle: bool = True) -> Any:
    """``DistributedSampler`` over ``range(n)``: this rank's share of one seeded global order per epoch.

    Rank r takes positions r, r + N, r + 2N, ... of the epoch's permutation, so with per-rank batches of
    ``batch / N`` the ranks' batches at step s together are positions [s * batch, (s + 1) * batch) — the
    batch one process takes at step s (the same sampler with N = 1). When N does not divide n the sampler
    repeats a few samples to even the ranks out (torch's behaviour); call ``set_epoch`` every epoch.
    """
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(range(n), num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)


def unwrap(model: Any) -> Any:
    """The bare module inside DistributedDataParallel / DataParallel."""
    return getattr(model, "module", model)


def wrap_model(model: Any, device: Any) -> Any:
    """Synchronised batch norm and DistributedDataParallel in a process group; ``model`` itself otherwise."""
    if not is_distributed():
        return model
    import torch
    from torch import nn

    ddp = nn.parallel.DistributedDataParallel
    # Batch-norm buffers are identical on every rank already (synchronised statistics): no sync per forward.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ddp(model, device_ids=[index], output_device=index, **no_buffer_sync)
    return ddp(convert_all_reduce_batchnorm(model), **no_buffer_sync)


def convert_all_reduce_batchnorm(module: Any) -> Any:
    """Every BatchNorm layer of ``module`` replaced by an ``AllReduceBatchNorm`` with the same weights and buffers.

    The state-dict keys stay the same, so the trained weights load into the plain network.
    """
    from torch import nn

    cls = _all_reduce_batchnorm_class()
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        ref = next(itertools.chain(module.parameters(), module.buffers()), None)
        if ref is not None:
            out = out.to(ref.device)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out
    for name, child in list(module.named_children()):
        module.add_module(name, convert_all_reduce_batchnorm(child))
    return module


_BN_CLASS: Any = None


def _all_reduce_batchnorm_class() -> Any:
    """Built on first use (torch is imported lazily)."""
    global _BN_CLASS
    if _BN_CLASS is not None:
        return _BN_CLASS
    import torch
    from torch import nn

    dist = _dist()

    class _SumOverRanks(torch.autograd.Function):
        """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of the ranks' gradients."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            dist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            out = grad.contiguous().clone()
            dist.all_reduce(out)
            return out

    class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
        """Batch norm over the global batch of every rank, for CPU (gloo), where SyncBatchNorm has no kernel.

        Training mode in a process group: mean and variance come from all ranks' samples (two differentiable
        all-reduces: sums and counts, then squared deviations), the running statistics follow them exactly as a
        single process's would over the whole batch. Otherwise (eval, or one process) plain batch norm.
        """

        def _check_input_dim(self, x: torch.Tensor) -> None:
            if x.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not (self.training and is_distributed()):
                return super().forward(x)
            dims = [0, *range(2, x.dim())]
            shape = [1, -1] + [1] * (x.dim() - 2)
            c = x.shape[1]
            count = torch.full((1,), float(x.numel() // max(c, 1)), dtype=x.dtype, device=x.device)
            sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
            n = sums[c]
            mean = sums[:c] / n
            sq = _SumOverRanks.apply(((x - mean.view(shape)) ** 2).sum(dims))
            var = sq / n  # biased, as batch norm normalises with
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                    unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                    self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
            y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            return y

    _BN_CLASS = AllReduceBatchNorm
    return _BN_CLASS


__all__ = [
    "ENV_VARS",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "convert_all_reduce_batchnorm",
    "env_rank",
    "env_world_size",
    "init_from_env",
    "launched_by_torchrun",
    "is_distributed",
    "is_initialized",
    "is_main",
    "local_batch",
    "local_rank",
    "rank",
    "sampler",
    "shutdown",
    "unwrap",
    "world_size",
    "wrap_model",
]
