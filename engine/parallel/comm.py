"""Every collective Weft issues, recorded: what this rank called last, on which group, and whether it returned.

Each function here has torch.distributed's signature and calls it; on the way it notes the operation, the group
(its mesh name and global ranks), the tensor's shape and dtype, the calling function, the training step, and when
the call started and returned. An asynchronous operation returns a handle whose `wait()` closes the record. The
record is what the watchdog (`engine/training/watchdog.py`) dumps when a collective hangs or a peer dies, so that a
dump says what each rank was waiting on; its blocked time feeds the straggler report. Nothing else in engine/
calls torch.distributed's collectives directly (tests/test_watchdog.py checks).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist


def _single(name: str, older: str):
    """torch >= 2.13 names the single-tensor collectives *_single (the *_tensor names warn as deprecated); looked
    up at each call, so a test that wraps torch.distributed's function sees it called."""
    return getattr(dist, name, None) or getattr(dist, older)


@dataclass
class Call:
    """One collective as this rank made it."""

    seq: int
    op: str
    group: str  # the mesh group's name (tp, dp, pp, embedding, checkpoint) or "world"
    ranks: list[int]
    shape: list[int] | None
    dtype: str | None
    caller: str  # module.function that called it
    step: int | None  # the training step in progress (1-based), None outside training
    thread: str
    started: float  # time.time()
    ended: float | None = None  # None: still waiting


@dataclass
class CollectiveLog:
    """This process's last `capacity` collectives and the ones still open; thread-safe (checkpoint writes run
    collectives from a thread of their own)."""

    capacity: int = 64
    step: int | None = None
    blocked_s: float = 0.0  # seconds spent inside collective calls and waits, summed over the process's life
    recent: deque = field(default_factory=deque)
    open: dict[int, Call] = field(default_factory=dict)
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, op: str, group: dist.ProcessGroup | None, tensor: torch.Tensor | None, depth: int = 2) -> Call:
        """Open a record for a call about to start; `depth` frames up is the code that asked for it."""
        frame = sys._getframe(depth)
        caller = f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}"
        with self._lock:
            self._seq += 1
            call = Call(self._seq, op, group_name(group), group_ranks(group),
                        list(tensor.shape) if tensor is not None else None,
                        str(tensor.dtype).removeprefix("torch.") if tensor is not None else None, caller, self.step,
                        threading.current_thread().name, time.time())
            self.open[call.seq] = call
            self.recent.append(call)
            while len(self.recent) > self.capacity:
                self.recent.popleft()
        return call

    def end(self, call: Call, blocked_since: float) -> None:
        """Close `call`; the time since `blocked_since` (perf_counter) was spent waiting in it."""
        with self._lock:
            call.ended = time.time()
            self.open.pop(call.seq, None)
            self.blocked_s += time.perf_counter() - blocked_since

    def oldest_open(self) -> Call | None:
        """The call that has waited longest, or None."""
        with self._lock:
            return min(self.open.values(), key=lambda c: c.started, default=None)

    def snapshot(self) -> dict:
        """The record as JSON-able data: open calls first, then the recent ones, oldest first."""
        with self._lock:
            return {"step": self.step, "blocked_s": self.blocked_s,
                    "open": [asdict(c) for c in sorted(self.open.values(), key=lambda c: c.seq)],
                    "recent": [asdict(c) for c in self.recent]}


LOG = CollectiveLog()
_NAMES: dict[int, str] = {}
_RANKS: dict[int, list[int]] = {}


def name_group(group: dist.ProcessGroup, name: str) -> None:
    """Give a process group its mesh name in the record (engine.parallel.state does, as it creates them)."""
    _NAMES[id(group)] = name


def group_name(group: dist.ProcessGroup | None) -> str:
    """The mesh name of `group` ("world" for the default group)."""
    return "world" if group is None else _NAMES.get(id(group), "other")


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of `group`, cached."""
    key = id(group)
    if key not in _RANKS:
        _RANKS[key] = (list(range(dist.get_world_size())) if group is None
                       else dist.get_process_group_ranks(group))
    return _RANKS[key]


class Handle:
    """An asynchronous collective's handle: `wait()` waits for it and closes its record."""

    def __init__(self, works: list, call: Call):
        self.works, self.call = works, call

    def wait(self) -> None:
        """Block until the operation is complete."""
        t0 = time.perf_counter()
        for work in self.works:
            work.wait()
        if self.call.ended is None:
            LOG.end(self.call, t0)

    def is_completed(self) -> bool:
        """True once every part has finished (without waiting)."""
        return all(w.is_completed() for w in self.works)


def _run(op: str, group: dist.ProcessGroup | None, tensor: torch.Tensor | None, fn, async_op: bool = False):
    """Record `fn()` (a torch.distributed call): closed on return, or by the handle's wait() if asynchronous."""
    call = LOG.begin(op, group, tensor, depth=3)  # above _run and the comm function
    t0 = time.perf_counter()
    result = fn()
    if async_op:
        return Handle([result], call)
    LOG.end(call, t0)
    return result


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None,
               async_op: bool = False):
    """torch.distributed.all_reduce, recorded."""
    return _run("all_reduce", group, tensor, lambda: dist.all_reduce(tensor, op=op, group=group, async_op=async_op),
                async_op)


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.broadcast (from global rank `src`), recorded."""
    _run("broadcast", group, tensor, lambda: dist.broadcast(tensor, src=src, group=group))


def all_gather(tensors: list[torch.Tensor], tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.all_gather into a list, recorded."""
    _run("all_gather", group, tensor, lambda: dist.all_gather(tensors, tensor, group=group))


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None,
                    async_op: bool = False):
    """Every rank's flat `input`, concatenated into `output` (torch's `all_gather_single`; its older name,
    `all_gather_into_tensor`, before 2.13), recorded."""
    return _run("all_gather", group, input,
                lambda: _single("all_gather_single", "all_gather_into_tensor")(output, input, group=group,
                                                                               async_op=async_op), async_op)


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None,
                        async_op: bool = False):
    """The sum over ranks of flat `input`, this rank's equal chunk of it into `output` (`reduce_scatter_single`,
    formerly `reduce_scatter_tensor`), recorded."""
    return _run("reduce_scatter", group, input,
                lambda: _single("reduce_scatter_single", "reduce_scatter_tensor")(output, input, group=group,
                                                                                  async_op=async_op), async_op)


def batch_isend_irecv(ops: list[dist.P2POp]) -> Handle:
    """Pipeline sends and receives posted together; one record, closed when the handle's wait() returns."""
    peers = sorted({op.peer for op in ops})
    first = ops[0].tensor if ops else None
    what = ",".join(f"send->{op.peer}" if op.op is dist.isend else f"recv<-{op.peer}" for op in ops)
    call = LOG.begin(f"send/recv {what}", None, first)
    call.group, call.ranks = "pp", peers
    return Handle(dist.batch_isend_irecv(ops), call)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.barrier, recorded."""
    _run("barrier", group, None, lambda: dist.barrier(group=group))


def all_gather_object(objects: list, obj, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.all_gather_object, recorded."""
    _run("all_gather_object", group, None, lambda: dist.all_gather_object(objects, obj, group=group))


def gather_object(obj, objects: list | None, dst: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.gather_object to global rank `dst`, recorded."""
    _run("gather_object", group, None, lambda: dist.gather_object(obj, objects, dst=dst, group=group))


def broadcast_object_list(objects: list, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.broadcast_object_list from global rank `src`, recorded."""
    _run("broadcast_object_list", group, None, lambda: dist.broadcast_object_list(objects, src=src, group=group))
