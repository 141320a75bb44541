"""`dinolike bench`: time the loop's own training step (command.py) on on-device synthetic batches or the
real loader (batches.py), with the device's matmul peak and the SDPA kernel that ran (device.py) and the
model FLOPs of a step (flops.py)."""

from dinolike.bench.command import MARKDOWN_HEADER, markdown_row, run_bench

__all__ = ["MARKDOWN_HEADER", "markdown_row", "run_bench"]
