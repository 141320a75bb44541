"""Launching dinolike on clusters: SLURM submission through submitit (`dinolike.launch.submit`) and the
per-task wrapper with the preemption / requeue protocol (`dinolike.launch.task`). The single-node SLURM
cluster the tests run on lives in tests/slurm/."""
