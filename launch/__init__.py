"""Launching dinolike on clusters: SLURM submission through submitit (`launch.submit`), the per-task
wrapper with the preemption/requeue protocol (`launch.task`) and a real single-node SLURM cluster for
tests (`launch.cluster`)."""
