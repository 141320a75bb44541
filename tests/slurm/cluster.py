"""A real single-node SLURM cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd) for tests.

Why: submitit's behaviour under preemption, requeue and accounting can only be trusted when it is
exercised against the real daemons, and CI machines have no SLURM. This module installs the Debian
packages when missing and starts every daemon in the foreground as a child process (no systemd), so
each one is known by pid and `Cluster.stop()` can stop exactly what it started.

Everything the cluster writes (configs, keys, database, state, spool, logs, pid list) lives under
the given workdir. Client commands find the cluster through the ``SLURM_CONF`` environment variable
(see `Cluster.environ`).

Usage::

    python -m slurm.cluster start DIR   # prints `export SLURM_CONF=...`
    python -m slurm.cluster stop DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slurm.pids import pid_alive, pid_is, terminate
from slurm.slurm_conf import NODE_NAME, PARTITION, write_configs

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
# Binaries we need, mapped to the package that provides them (to decide whether to install).
BINARIES = {
    "munged": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "slurmdbd": "slurmdbd",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "sacctmgr": "slurm-client",
}
# Start order; stop goes in reverse.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
PIDS_FILE = "pids.json"


class ClusterUnavailable(RuntimeError):
    """A test cluster cannot run on this machine (not root, not Debian, apt failed).

    Tests turn it into a skip with its message, so it must say what is missing.
    """


class ClusterError(RuntimeError):
    """A daemon failed to start or to stop; the message carries the tail of its log."""


@dataclass
class Cluster:
    """Handle on a running test cluster: where it lives and which pids belong to it."""

    workdir: Path
    name: str = "dinolike"
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _children: dict[int, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        return self.workdir / "etc" / "slurm.conf"

    @property
    def partition(self) -> str:
        return PARTITION

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for slurm client commands (sbatch, sacct, scontrol) aimed at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a slurm client command against this cluster and return its stdout."""
        proc = subprocess.run(
            list(cmd), env=self.environ(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    @classmethod
    def attach(cls, workdir: str | Path) -> Cluster:
        """Rebuild the handle of a cluster started by another process (reads its pid file)."""
        workdir = Path(workdir).resolve()
        path = workdir / "run" / PIDS_FILE
        if not path.exists():
            raise ClusterError(f"no cluster pid file at {path}: was `start` run with this directory?")
        info = json.loads(path.read_text())
        return cls(workdir=workdir, name=info["name"], pids={k: int(v) for k, v in info["pids"].items()})

    def alive(self) -> dict[str, int]:
        """The daemons of this cluster whose process still runs."""
        return {n: p for n, p in self.pids.items() if pid_alive(p, self._children.get(p))}

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """Cancel remaining jobs, then stop every daemon this cluster started, by pid, newest first.

        Returns the pids that were stopped. Raises ClusterError if one survives SIGKILL.
        """
        if self.pids.get("slurmctld") and pid_alive(self.pids["slurmctld"], None):
            self._cancel_all_jobs()
        stopped: dict[str, int] = {}
        for name in reversed(DAEMONS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            child = self._children.get(pid)
            if pid_alive(pid, child) and pid_is(pid, name):
                terminate(pid, child, timeout)
            stopped[name] = pid
        survivors = self.alive()
        if survivors:
            raise ClusterError(f"daemons still running after stop: {survivors}")
        pid_file = self.workdir / "run" / PIDS_FILE
        if pid_file.exists():
            pid_file.unlink()
        return stopped

    def _cancel_all_jobs(self) -> None:
        """Jobs hold slurmstepd processes; cancel them so stopping slurmd leaves nothing behind."""
        try:
            ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).split()
            if ids:
                self.run("scancel", *ids, check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                    "squeue", "-h", "-o", "%i", check=False, timeout=10
                ).split():
                    time.sleep(0.5)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _save_pids(self) -> None:
        path = self.workdir / "run" / PIDS_FILE
        path.write_text(json.dumps({"name": self.name, "pids": self.pids}, indent=1))


# ---------------------------------------------------------------------------------------------
# platform checks and installation


def check_platform() -> None:
    """Raise ClusterUnavailable unless this is a root shell on Debian with apt-get."""
    if sys.platform != "linux":
        raise ClusterUnavailable(f"test SLURM cluster needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        raise ClusterUnavailable("test SLURM cluster needs root (it starts munge/mariadb/slurm daemons)")
    if not Path("/etc/debian_version").exists():
        raise ClusterUnavailable("test SLURM cluster needs Debian (installs slurm with apt-get)")


def missing_packages() -> list[str]:
    """Debian packages whose binaries are not on PATH (or in /usr/sbin)."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin"
    return sorted({pkg for exe, pkg in BINARIES.items() if shutil.which(exe, path=search) is None})


def ensure_packages(log: Path | None = None) -> float:
    """Install the SLURM stack with apt-get when missing; returns seconds spent (0 if nothing to do)."""
    missing = missing_packages()
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"apt-get not found; cannot install {missing}")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # stale package lists are the usual cause: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0 or missing_packages():
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-5:])
        raise ClusterUnavailable(f"apt-get could not install {list(PACKAGES)}:\n{tail}")
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# process helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def _wait(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `ready()` until true; fail fast with the daemon's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise ClusterError(f"{what} exited with code {proc.returncode}; log {log}:\n{_tail(log)}")
        time.sleep(0.2)
    raise ClusterError(f"{what} not ready after {timeout:.0f}s; log {log}:\n{_tail(log)}")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _chown(path: Path, user: str, mode: int) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


def _check_traversable(path: Path) -> None:
    """munge and mysql run as their own users, so every folder above the workdir must let them in."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise ClusterUnavailable(
                f"{parent} (mode {stat.filemode(mode)}) is not traversable by other users; the munge and "
                f"mysql daemons could not reach {path}. Use a workdir under e.g. /tmp with o+x parents."
            )


# ---------------------------------------------------------------------------------------------
# start


def start_cluster(
    workdir: str | Path, name: str = "dinolike", cpus: int = 2, install: bool = True, timeout: float = 60
) -> Cluster:
    """Start munged, MariaDB, slurmdbd, slurmctld and slurmd with all state under `workdir`.

    Raises ClusterUnavailable when this machine cannot host one (callers skip), ClusterError when a
    daemon fails (message has its log). On failure everything already started is stopped again.
    """
    check_platform()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    _check_traversable(workdir)
    for sub in ("etc", "log", "run", "state/ctld", "spool/slurmd", "munge", "mysql"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir=workdir, name=name)
    if (workdir / "run" / PIDS_FILE).exists():
        old = Cluster.attach(workdir)
        if old.alive():
            raise ClusterError(f"a cluster already runs in {workdir} (pids {old.alive()}); stop it first")
    if install:
        cluster.timings["install_s"] = ensure_packages(workdir / "log" / "apt.log")
    elif missing_packages():
        raise ClusterUnavailable(f"missing packages {missing_packages()} and install=False")
    t0 = time.monotonic()
    try:
        _start_daemons(cluster, cpus, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.stop()
        raise
    cluster.timings["start_s"] = time.monotonic() - t0
    return cluster


def _spawn(cluster: Cluster, name: str, cmd: Sequence[str], env: dict[str, str], user: str | None = None):
    log = cluster.workdir / "log" / f"{name}.out"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            list(cmd), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            user=user, start_new_session=True, cwd=cluster.workdir,
        )  # fmt: skip
    cluster.pids[name] = proc.pid
    cluster._children[proc.pid] = proc
    cluster._save_pids()
    return proc, log


def _start_daemons(cluster: Cluster, cpus: int, timeout: float) -> None:
    wd = cluster.workdir
    ports = {"slurmctld": _free_port(), "slurmd": _free_port(), "slurmdbd": _free_port()}

    # munge: own key and socket, running as the munge user.
    mdir, kdir = wd / "munge", wd / "munge" / "key"
    kdir.mkdir(exist_ok=True)
    _chown(mdir, "munge", 0o755)  # socket folder: every job user must reach the socket
    _chown(kdir, "munge", 0o700)
    key = kdir / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(128))
    _chown(key, "munge", 0o600)
    munge_socket = mdir / "munge.socket"
    munge_cmd = [
        "munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
        f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
        f"--seed-file={mdir / 'munged.seed'}",
    ]  # fmt: skip
    proc, log = _spawn(cluster, "munged", munge_cmd, dict(os.environ), user="munge")
    _wait("munged", munge_socket.exists, proc, mdir / "munged.log", timeout)

    # MariaDB: own datadir, unix socket only (no TCP), pid/error files in a folder mysql owns.
    sql = wd / "mysql"
    _chown(sql, "mysql", 0o755)
    data, mysql_socket = sql / "data", sql / "mysqld.sock"
    if not (data / "mysql").exists():
        init = subprocess.run(
            ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={data}",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True,
        )  # fmt: skip
        (wd / "log" / "mariadb-install-db.log").write_text(init.stdout + init.stderr)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed:\n{(init.stdout + init.stderr)[-2000:]}")
    mysql_cmd = [
        "mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}", f"--socket={mysql_socket}",
        f"--pid-file={sql / 'mariadbd.pid'}", f"--log-error={sql / 'mariadbd.err'}", "--skip-networking",
        "--innodb-buffer-pool-size=32M", "--skip-log-bin",
    ]  # fmt: skip
    proc, log = _spawn(cluster, "mariadbd", mysql_cmd, dict(os.environ))
    _wait("mariadbd", mysql_socket.exists, proc, sql / "mariadbd.err", timeout)

    conf = write_configs(wd, cluster.name, cpus, ports, munge_socket)
    env = cluster.environ()
    # libmariadb reads MYSQL_UNIX_PORT when no socket is given: points slurmdbd at our private server.
    dbd_env = dict(env, MYSQL_UNIX_PORT=str(mysql_socket))
    proc, log = _spawn(cluster, "slurmdbd", ["slurmdbd", "-D"], dbd_env)
    _wait("slurmdbd", lambda: _port_open(ports["slurmdbd"]), proc, wd / "log" / "slurmdbd.log", timeout)

    add = subprocess.run(
        ["sacctmgr", "-i", "add", "cluster", cluster.name], env=env, capture_output=True, text=True, timeout=30
    )
    listed = cluster.run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster", check=False)
    if cluster.name not in listed.split():
        raise ClusterError(f"sacctmgr could not register cluster {cluster.name}: {add.stdout}{add.stderr}")

    proc, log = _spawn(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)], env)
    _wait(
        "slurmctld", lambda: "UP" in cluster.run("scontrol", "ping", check=False, timeout=5),
        proc, wd / "log" / "slurmctld.log", timeout,
    )  # fmt: skip
    proc, log = _spawn(cluster, "slurmd", ["slurmd", "-D", "-N", NODE_NAME, "-f", str(conf)], env)

    def node_idle() -> bool:
        state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=5).strip()
        if state.startswith(("drain", "down")) and proc.poll() is None:
            reason = cluster.run("sinfo", "-h", "-N", "-o", "%E", check=False, timeout=5).strip()
            if "Not responding" not in reason and reason:
                raise ClusterError(f"node {NODE_NAME} is {state}: {reason}")
        return state == "idle"

    _wait("slurmd", node_idle, proc, wd / "log" / "slurmd.log", timeout)


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--name", default="dinolike", help="SLURM ClusterName")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the node offers")
    parser.add_argument("--no-install", action="store_true", help="fail instead of running apt-get")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            cluster = start_cluster(args.workdir, name=args.name, cpus=args.cpus, install=not args.no_install)
            times = ", ".join(f"{k}={v:.1f}" for k, v in cluster.timings.items())
            print(f"cluster {cluster.name} up ({times}); pids {cluster.pids}", file=sys.stderr)
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "stop":
            stopped = Cluster.attach(args.workdir).stop()
            print(f"stopped {stopped}", file=sys.stderr)
        else:
            cluster = Cluster.attach(args.workdir)
            print(json.dumps({"pids": cluster.pids, "alive": cluster.alive()}))
    except ClusterUnavailable as e:
        print(f"cluster unavailable: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"cluster error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
