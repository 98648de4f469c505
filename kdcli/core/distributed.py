"""Several processes on one or more machines, as `torchrun --nproc_per_node=N -m kdcli distill ...` starts them.

Each process (rank) holds the whole dataset and a replica of every trained model. A training step's
batch (trainer.batch_size, the global batch) is split between the ranks; DistributedDataParallel
averages the gradients, so N processes follow the recipe of one process: the same batches in the
same order, the same number of steps and learning rates. Rank 0 alone writes files (checkpoints,
training states, metrics, the teacher-output cache) and logs; the others wait where they read what
it wrote. Collectives go over gloo for tensors in host memory and NCCL for CUDA tensors.

Outside torchrun (WORLD_SIZE unset or 1) every function here is a no-op that answers for rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

from kdcli.core.errors import KdError

if TYPE_CHECKING:
    import torch


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """In a process group (torch is imported lazily: `kd --help` must not wait for it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return sys.modules["torch.distributed"].get_rank() if active() else 0


def world() -> int:
    return sys.modules["torch.distributed"].get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Join the process group torchrun describes in the environment (MASTER_ADDR, RANK, ...):
    gloo for host tensors, and NCCL for CUDA tensors where this torch build has it."""
    if active() or not launched():
        return
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise KdError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not: start several "
            "processes with torchrun (torchrun --nproc_per_node=N -m kdcli distill ...), or unset WORLD_SIZE."
        )
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    # Long: the other ranks wait while rank 0 alone downloads a dataset or computes the teacher cache
    dist.init_process_group(backend=backend, timeout=timedelta(hours=2))


def close() -> None:
    if active():
        sys.modules["torch.distributed"].destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) when the run trains on CUDA."""
    if active() and device.type == "cuda":
        import torch

        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return device


def same(value: Any) -> Any:
    """Rank 0's value on every rank (a run directory's name, a decision only rank 0 may take)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_main(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 alone and give its result, or its KdError, to every rank."""
    if not active():
        return fn()
    outcome: tuple = (None, None)
    if is_main():
        try:
            outcome = (fn(), None)
        except KdError as e:
            outcome = (None, str(e))
    result, problem = same(outcome)
    if problem is not None:
        raise KdError(problem)
    return result


def barrier() -> None:
    if active():
        sys.modules["torch.distributed"].barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a dataset download, a cache it writes), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def most(value: int) -> int:
    """The largest of the ranks' values, on every rank (a stop signal, a step to skip: they must agree)."""
    if not active():
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(value)])  # a host tensor: gloo, no wait for a GPU stream
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def most_inplace(t) -> None:
    """t becomes its largest value over the ranks, on t's own device (NCCL on a GPU: no wait)."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def sync_buffers(module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank: each rank updated its own
    with its part of the batches, and validation must see the same model everywhere."""
    if active():
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, src=0)


def all_sum(t):
    """The sum over ranks of the tensor t (a copy; t itself is left as it is)."""
    if not active():
        return t
    out = t.clone()
    sys.modules["torch.distributed"].all_reduce(out)
    return out


def part(n: int) -> tuple[int, int]:
    """This rank's rows [lo, hi) of a batch of n: as equal as can be (sizes differ by one at most)."""
    r, w = rank(), world()
    return r * n // w, (r + 1) * n // w


def wrap(module):
    """The module in DistributedDataParallel when several processes train (else itself).
    static_graph: the parameters a step uses are found in the first step and are the same in
    every step of a loop, also when some are left out (FitNets' hint stage trains the student's
    lower layers only)."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return module
    device = next(iter(params)).device
    # broadcast_buffers=False: batch-norm statistics are read in validation only, and sync_buffers gives
    # every rank rank 0's before it (rather than a broadcast at every training forward)
    devices = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=devices, static_graph=True, broadcast_buffers=False)
