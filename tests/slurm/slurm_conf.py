"""The configuration files of the single-node test cluster (`launch/cluster.py`): slurm.conf, slurmdbd.conf.

Everything a daemon writes is pointed inside the cluster's workdir, and the node is sized below the
machine's real memory (above it, slurm drains the node).
"""

from __future__ import annotations

import os
from pathlib import Path

NODE_NAME = "localhost"
PARTITION = "debug"


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def write_configs(
    workdir: Path, name: str, cpus: int, ports: dict[str, int], munge_socket: Path, cred_expire_s: int = 10
) -> Path:
    """Write slurm.conf and slurmdbd.conf under workdir/etc; returns the slurm.conf path."""
    etc = workdir / "etc"
    # RealMemory above the real memory drains the node; stay well below it.
    real_mem = max(512, int(_memory_mb() * 0.8))
    common = ["AuthType=auth/munge", f"AuthInfo=socket={munge_socket}"]
    slurm_conf = [
        f"ClusterName={name}",
        f"SlurmctldHost={NODE_NAME}",
        # cred_expire also holds a requeued job back (BeginTime = now + cred_expire + 1, default
        # 120 s); a short one keeps the requeue tests fast.
        f"AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}",
        common[0],
        "CredType=cred/munge",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ports['slurmctld']}",
        f"SlurmdPort={ports['slurmd']}",
        f"StateSaveLocation={workdir / 'state' / 'ctld'}",
        f"SlurmdSpoolDir={workdir / 'spool' / 'slurmd'}",
        f"SlurmctldPidFile={workdir / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={workdir / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={workdir / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={workdir / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",  # requeued jobs start when eligible, not a minute later
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        "KillWait=10",
        "MinJobAge=600",
        "InactiveLimit=0",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/slurmdbd",
        f"AccountingStorageHost={NODE_NAME}",
        f"AccountingStoragePort={ports['slurmdbd']}",
        # For slurmdbd connections slurm takes the munge socket from here, not from AuthInfo.
        f"AccountingStoragePass={munge_socket}",
        f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_mem} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP",
    ]
    (etc / "slurm.conf").write_text("\n".join(slurm_conf) + "\n")
    dbd_conf = [
        *common,
        f"DbdHost={NODE_NAME}",
        f"DbdPort={ports['slurmdbd']}",
        "SlurmUser=root",
        f"PidFile={workdir / 'run' / 'slurmdbd.pid'}",
        f"LogFile={workdir / 'log' / 'slurmdbd.log'}",
        "DebugLevel=info",
        "StorageType=accounting_storage/mysql",
        "StorageHost=localhost",
        "StorageUser=root",
        f"StorageLoc={name}_acct_db",
    ]
    dbd_path = etc / "slurmdbd.conf"
    dbd_path.write_text("\n".join(dbd_conf) + "\n")
    os.chmod(dbd_path, 0o600)  # slurmdbd refuses a config readable by others
    return etc / "slurm.conf"
