"""The parallel state: one (pp, dp, tp) mesh over the world, and every group and coordinate derived from it.

Global rank = (pp_rank * dp + dp_rank) * tp + tp_rank: tensor parallel innermost (its groups stay inside a node),
pipeline outermost. Modules receive a `ParallelState`; nothing else reads RANK or calls `new_group`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel import comm


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in the mesh."""

    pp: int
    dp: int
    tp: int


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates, its process groups and its device."""

    tp: int
    pp: int
    dp: int
    rank: int
    device: torch.device
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None  # first and last stage: a tied embedding's two copies
    checkpoint_group: dist.ProcessGroup | None = None  # the world again, on gloo: asynchronous checkpoint writes

    @property
    def world_size(self) -> int:
        """Processes in the mesh."""
        return self.tp * self.pp * self.dp

    def coords(self, rank: int | None = None) -> Coords:
        """Mesh coordinates of `rank` (default: this rank)."""
        r = self.rank if rank is None else rank
        return Coords(pp=r // (self.dp * self.tp), dp=(r // self.tp) % self.dp, tp=r % self.tp)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        """Global rank at mesh coordinates (pp, dp, tp)."""
        return (pp * self.dp + dp) * self.tp + tp

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self.coords().dp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage (its first model chunk's)."""
        return self.coords().pp

    def pp_peer(self, pp: int) -> int:
        """Global rank of pipeline rank `pp` (mod pp) in this rank's pipeline (same dp and tp coordinates)."""
        c = self.coords()
        return self.rank_of(pp % self.pp, c.dp, c.tp)

    @property
    def logging_rank(self) -> int:
        """The one rank that logs: first data- and tensor-parallel rank of the last pipeline stage (it has the loss)."""
        return self.rank_of(self.pp - 1, 0, 0)

    @property
    def is_logging_rank(self) -> bool:
        """True on the logging rank."""
        return self.rank == self.logging_rank


def pick_device(requested: str = "auto") -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (or asked for), else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def default_backend(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain single process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def init_parallel(tp: int, pp: int, dp: int, device: torch.device, backend: str = "auto",
                  timeout_s: float = 600.0, checkpoint_group: bool = False) -> ParallelState:
    """Join the default process group (env://) if there is more than one process, and build the mesh's groups
    (with `checkpoint_group`, also a gloo group of the world for a background checkpoint writer)."""
    rank, world = world_from_env()
    if tp * pp * dp != world:
        raise ValueError(f"tp={tp} x pp={pp} x dp={dp} != world size {world}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    state = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, device=device)
    if world == 1:
        return state
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(default_backend(device) if backend == "auto" else backend, rank=rank,
                                world_size=world, timeout=timeout, store=rendezvous_store(rank, world, timeout))
    # Every rank must create every group, in the same order.
    for kind, attr in (("tp", "tp_group"), ("dp", "dp_group"), ("pp", "pp_group"), ("embedding", "embedding_group")):
        for members in mesh_groups(state, kind):
            group = dist.new_group(members, timeout=timeout)
            comm.name_group(group, kind)  # what fault dumps call it
            if rank in members:
                setattr(state, attr, group)
    if checkpoint_group:
        state.checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
        comm.name_group(state.checkpoint_group, "checkpoint")
    return state


def rendezvous_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The env:// store (MASTER_ADDR:MASTER_PORT; rank 0 hosts it unless torchrun's agent does), its keys kept
    apart per torchrun attempt: a restarted attempt reusing the agent's store would otherwise read the dead
    attempt's gloo addresses and fail to connect (torch 2.13)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timeout, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return dist.PrefixStore(f"weft/attempt-{attempt}", store) if attempt is not None else store


def mesh_groups(state: ParallelState, kind: str) -> list[list[int]]:
    """All groups of one kind ('tp', 'dp', 'pp' or 'embedding'), each a sorted list of global ranks.

    An embedding group joins the first and last stage of one pipeline (none without pipelining).
    """
    groups = []
    if kind == "tp":
        for pp in range(state.pp):
            for dp in range(state.dp):
                groups.append([state.rank_of(pp, dp, t) for t in range(state.tp)])
    elif kind == "dp":
        for pp in range(state.pp):
            for tp in range(state.tp):
                groups.append([state.rank_of(pp, d, tp) for d in range(state.dp)])
    elif kind == "pp":
        for dp in range(state.dp):
            for tp in range(state.tp):
                groups.append([state.rank_of(p, dp, tp) for p in range(state.pp)])
    elif kind == "embedding":
        if state.pp > 1:
            for dp in range(state.dp):
                for tp in range(state.tp):
                    groups.append([state.rank_of(0, dp, tp), state.rank_of(state.pp - 1, dp, tp)])
    else:
        raise ValueError(f"unknown group kind {kind!r}")
    return groups


def shutdown() -> None:
    """Leave the process group cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()
