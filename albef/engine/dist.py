"""Process-group setup from whichever launcher started us: torchrun, the deepspeed launcher, or SLURM's srun.

torchrun / ``deepspeed`` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under ``srun`` (one task
per GPU) we derive them from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST (the first node is the
master) and SLURM_JOB_ID (the port), which the official ALBEF code never did (its SLURM branch left world_size at
1 and no master address). All five variables are exported before DeepSpeed starts: with any missing it tries MPI.
"""

from __future__ import annotations

import datetime
import importlib
import os
import re
import socket
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand SLURM's compressed host list: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: List[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def detect() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 0)) or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", hosts[0]),
            master_port=port,
            launcher="slurm",
        )
    # A single process still gets a (one-member) process group from DeepSpeed: give it a free port, so that
    # several single-process runs on one machine do not collide on the default 29500.
    return DistEnv(master_port=int(env.get("MASTER_PORT", 0)) or _free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(env: DistEnv, timeout_s: float = 1800) -> torch.device:
    """Export the launcher variables, pick the device, start the process group (a no-op at world size 1). A
    collective that waits more than ``timeout_s`` (a rank died or hangs) raises instead of waiting forever."""
    for k, v in dict(
        RANK=env.rank,
        WORLD_SIZE=env.world_size,
        LOCAL_RANK=env.local_rank,
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=env.master_port,
    ).items():
        os.environ[k] = str(v)
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
        # DeepSpeed JIT-builds a shared-memory all-reduce op on first init on CPU (~40 s, g++); gloo is enough
        # for us, so the build is skipped (the module object must be patched, see ENVIRONMENT notes).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    if env.world_size > 1 or env.launcher != "none":
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return device


def initialized() -> bool:
    """Whether a process group is running (every helper below is a no-op / the identity without one)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def rank_share(n: int) -> range:
    """This rank's share of ``range(n)`` when evaluation is split over ranks: every world-th index from its rank,
    so the shares differ by at most one item. The one way every task splits evaluation."""
    rank, world = rank_and_world()
    return range(rank, n, world)


def gather_objects(obj) -> List:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_lists(items: Sequence) -> list:
    """Every rank's list, concatenated in rank order (identical on every rank)."""
    return [x for part in gather_objects(list(items)) for x in part]


def sum_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums over ranks (float64, so that counts stay exact)."""
    return sum_tensor_over_ranks(torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)).tolist()


@torch.no_grad()
def sum_tensor_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of every rank's ``x`` (a new tensor; ``x`` itself without a process group)."""
    if rank_and_world()[1] == 1:
        return x
    out = x.clone()
    torch.distributed.all_reduce(out)
    return out


@torch.no_grad()
def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, without gradient (``x`` itself without a process group)."""
    if rank_and_world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def any_over_ranks(*flags: bool) -> Tuple[bool, ...]:
    """Each flag OR-ed over the ranks, in one all-reduce, so that every rank takes the same decision."""
    if not initialized():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def shutdown() -> None:
    if initialized():
        torch.distributed.destroy_process_group()
