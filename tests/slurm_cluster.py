"""A real two-node Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd, all private.

    with slurm_cluster(tmp_path / "slurm") as env:          # skips the test unless root with Slurm installed
        subprocess.run(["sbatch", ...], env=env, check=True)

Needs the Debian packages `slurm-wlm munge` (Slurm 22.05) and root; nothing is installed here. The daemons use a
private munge key, socket, slurm.conf, state and logs under the given directory and ports chosen at run time, so
they never touch a system-wide Slurm, and they are stopped (by pid) when the block exits, however it exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
NODES = ("n1", "n2")


def _find(name: str) -> str | None:
    """The binary's path, also looking in the sbin directories a non-login PATH may lack."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def require_slurm() -> dict[str, str]:
    """Paths of the Slurm and munge binaries; pytest.skip (naming what is missing) unless they exist and we are root."""
    paths = {name: _find(name) for name in DAEMONS + CLIENTS}
    missing = sorted(name for name, path in paths.items() if path is None)
    if missing:
        pytest.skip(f"Slurm not installed (no {', '.join(missing)}); apt-get install slurm-wlm munge")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root; run the test as root")
    return paths  # type: ignore[return-value]


def _free_ports(n: int) -> list[int]:
    """`n` distinct loopback TCP ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _slurm_conf(root: Path, munge_socket: Path, cpus: int) -> str:
    """slurm.conf text: this host as controller, nodes n1 and n2 on loopback, state and logs under `root`.

    Jobs run in partition `debug`; a job in `urgent` preempts them (SIGTERM, 60 s grace, then requeued).
    """
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
ClusterName=weft-test
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes={",".join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


def _daemon_logs(root: Path, chars: int = 3000) -> str:
    """The end of every daemon log and captured output under `root`, for error messages."""
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}"
                     for f in sorted([*root.glob("*.log"), *root.glob("*.out")]))


def _wait_for(ready, procs: list[subprocess.Popen], root: Path, timeout: float, what: str) -> None:
    """Poll `ready()` until true; raise RuntimeError with the logs on timeout or if a daemon died."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
            raise RuntimeError(f"local Slurm cluster: waiting for {what}: {why}\n{_daemon_logs(root)}")
        time.sleep(0.5)


def _nodes_idle(env: dict[str, str]) -> bool:
    """Whether sinfo answers and shows every node idle."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True,
                             timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)
    return out.returncode == 0 and all(states.get(name) == "idle" for name in NODES)


def _stop(procs: list[subprocess.Popen], env: dict[str, str]) -> None:
    """Cancel any job left behind, then SIGTERM each daemon (newest first), SIGKILL any that does not exit."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        jobs = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True,
                              timeout=10).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, capture_output=True, timeout=10)
            time.sleep(2)  # let the slurmd kill the jobs' processes before they go
    for proc in reversed(procs):
        proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def slurm_cluster(root: str | os.PathLike, cpus: int = 1, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start a private cluster of nodes n1 and n2 (`cpus` CPUs each) under `root`; yield an env for its clients.

    The env is os.environ plus SLURM_CONF and a PATH holding the Slurm binaries. Raises RuntimeError with the
    daemon logs if a daemon dies or the nodes are not idle within `timeout` seconds.
    """
    paths = require_slurm()
    root = Path(root).resolve()
    for d in (root / "state", *(root / "spool" / name for name in NODES)):
        d.mkdir(parents=True, exist_ok=True)
    # munged insists that every directory above its socket be searchable by all, which a pytest tmp dir is not;
    # /tmp is, and keeps the path short (a socket path has at most 107 bytes).
    sock_dir = Path(tempfile.mkdtemp(prefix="weft-munge-", dir="/tmp"))
    sock_dir.chmod(0o755)
    munge_socket = sock_dir / "munge.socket"
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket, cpus))
    bin_dirs = sorted({str(Path(p).parent) for p in paths.values()})
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.pathsep.join([*bin_dirs, os.environ.get("PATH", "")])}
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> None:
        with open(root / f"{name}.out", "wb") as out:
            procs.append(subprocess.Popen([paths[cmd[0]], *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))

    try:
        start("munged", "munged", "-F", f"--socket={munge_socket}", f"--key-file={key}",
              f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
              f"--seed-file={root / 'munged.seed'}")
        _wait_for(munge_socket.exists, procs, root, timeout, "the munged socket")
        start("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
        for name in NODES:
            start(f"slurmd-{name}", "slurmd", "-D", "-N", name, "-f", str(conf))
        _wait_for(lambda: _nodes_idle(env), procs, root, timeout, f"nodes {', '.join(NODES)} idle")
        yield env
    finally:
        _stop(procs, env)
        shutil.rmtree(sock_dir, ignore_errors=True)
