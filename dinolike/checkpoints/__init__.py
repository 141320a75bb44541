"""A run's saved state: written atomically (`atomic`), one file per checkpoint or one DCP folder for sharded runs
(`dcp`), listed, verified and read back (`files`).

It stands below training and interop because both read checkpoints: training to resume, interop (export,
eval, a distillation teacher) to take the backbone out of one.
"""
