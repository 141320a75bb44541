"""The fault-injection suite's table: each fault injected and what the tests assert happens.

FAULTS is the claim; each test calls `record(key, observed)` once its assertions passed. With
DINOLIKE_FAULT_REPORT=FILE set, the observations are appended to FILE (JSON lines), and
`python benchmarks/reliability.py` renders them into README.md's RELIABILITY section, so the table shows
what a run of the suite saw, and a fault whose test did not pass shows as not verified.
"""

from __future__ import annotations

import json
import os
import re

FAULTS: dict[str, tuple[str, str]] = {
    "kill-random": ("`kill -9` at a random point of a random iteration (forward pass, or between optimizer "
                    "step and EMA update), 3 seeds",
                    "rerun resumes from the newest checkpoint; final teacher bit-identical to an uninterrupted run"),
    "kill-write": ("`kill -9` during a checkpoint write: half-written temp file, complete temp file before the "
                   "rename, after the rename before pruning",
                   "the temp file is never loaded and is removed on resume; final teacher bit-identical"),
    "ckpt-damaged": ("newest checkpoint truncated, zero bytes, not a checkpoint (a backbone file), or one byte "
                     "flipped inside a tensor",
                     "warning names the file (renamed `*.damaged`); resume from the previous one; final teacher "
                     "bit-identical"),
    "ckpt-all-damaged": ("every checkpoint of the run damaged",
                         "one-line error, exit 2; files left in place, nothing trained from scratch"),
    "disk-full": ("file-size limit (`RLIMIT_FSIZE`, as `ulimit -f`) hit while writing a checkpoint",
                  "one-line error naming the file and the intact previous checkpoint, exit 1; no temp file left"),
    "nan-weights": ("NaN written into a student weight mid-run",
                    "stops naming the iteration and the loss term, exit 1; last good checkpoint intact and newest, "
                    "nothing exported"),
    "nan-one-rank": ("a NaN loss on one of 2 processes only (the KoLeo term of rank 1)",
                     "both processes stop at the same iteration naming it and the term, exit 1; no hang; last "
                     "checkpoint finite"),
    "nan-checkpoint": ("a state holding NaN handed to the checkpoint writer",
                       "refused, naming the tensor; the previous checkpoint stays the newest"),
    "images-mixed": ("image folder with corrupt, truncated, zero-byte, wrong-extension, CMYK, 16-bit and 1x1 "
                     "files, and headers claiming 10000x10000 and 20000x20000 pixels",
                     "unreadable files skipped and counted once each (`skipped_files`) and per draw "
                     "(`skipped_draws`); CMYK, 16-bit, 1x1 and misnamed images decoded correctly; no crash, no hang"),
    "images-all-bad": ("`dinolike train` on a folder whose images are all corrupt",
                       "fails before training: one-line error naming files, exit 2, nothing exported"),
    "images-too-many-bad": ("3 corrupt files in a folder of 23 (13 % > `data.max_skipped_fraction` 0.05)",
                            "stops with a one-line error naming the bad files, exit 2, nothing exported"),
    "stop-time-limit": ("`run.time_limit_min` reached",
                        "checkpoint and teacher export of that iteration, exit 0; the final kNN evaluates it"),
    "stop-signal": ("SIGTERM (preemption) mid-run",
                    "checkpoint and teacher export of that iteration, exit 3 (requeue)"),
    "submit-bad-config": ("`dinolike submit` (train, curate, eval) with a misspelt key or a bad value",
                          "one-line config error, exit 2, nothing submitted"),
    "command-bad-config": ("`dinolike curate all` with a misspelt method, `dinolike eval knn` with a bad override "
                           "or dataset spec",
                           "one-line error, exit 2, before any work (no shard written, no feature extracted)"),
    "shard-damaged": ("curation embedding shard truncated, emptied, one byte flipped, or its paths file edited "
                      "after it was committed",
                      "later steps refuse it with a one-line error; `embed` recomputes it, equal to a clean run"),
    "embed-killed": ("curation `embed` killed (`kill -9`) mid-shard",
                     "rerun keeps complete shards untouched and computes the rest, equal to a clean run"),
    "constant-embeddings": ("`configs/folder_vits14.yaml` shrunk to a CPU (ViT pico, 32 px, 8 iterations) with "
                            "LayerScale 1e-5: every image gets the same CLS embedding",
                            "warned at the first logged row (log.txt and terminal); the run ends with a one-line "
                            "error, exit 1, nothing exported; `dinolike export` refuses the checkpoint (exit 2) "
                            "unless `--allow-collapsed`, which marks the model card; the recipe's own LayerScale "
                            "(0.1) trains and exports"),
    "no-config": ("`dinolike train` without `--config`",
                  "one-line error naming the shipped recipes, exit 2; nothing started or created"),
    "ctrl-c": ("Ctrl-C (a real SIGINT to the process group) mid-run: 1 process, 2 processes, 1 process with 2 "
               "data-loader workers; Ctrl-C twice",
               "checkpoint and teacher export of that iteration, exit 3, no traceback; twice: abort at once with "
               "one line, exit 130, the last checkpoint intact"),
    "disk-full-tmpfs": ("a real full filesystem (a tmpfs mounted with room for the logs only) while writing a "
                        "checkpoint (root only; skipped otherwise)",
                        "one-line error naming the file, ENOSPC and the intact previous checkpoint, exit 1; no "
                        "temp file left; after room is made the same command ends bit-identical"),
    "output-dir": ("`run.output_dir` that is a file, or on a read-only filesystem",
                   "one-line error before any work, exit 2"),
    "bad-values": ("negative lr or weight decay, min_lr above the lr, momentum or betas above 1, an inverted "
                   "crop-scale range",
                   "one-line error naming the key and its range, exit 2, before anything is created; every "
                   "shipped recipe passes"),
    "resume-changed-config": ("rerun of a finished run with `optim.epochs` and `optim.base_lr` changed",
                              "refused with the keys that differ (old -> new), exit 2; config.yaml and checkpoints "
                              "untouched; operational keys may differ; `run.allow_config_change=true` resumes and "
                              "logs the changes"),
    "log-txt": ("a clean run, a resume past a damaged checkpoint, a run that fails",
                "log.txt and the terminal (with `run.progress=false` too) hold the start summary, every metrics "
                "row, resume warnings, the end or the error"),
    "cpu-estimate": ("`configs/folder_vits14.yaml` (ViT-S/14, 224 px) started on a CPU",
                     "before the first step: a warning with the estimated time on this CPU (log.txt and "
                     "terminal); the CPU main job gets none"),
    "constant-every-path": ("LayerScale 1e-5 (constant embeddings) stopped by Ctrl-C, by `run.time_limit_min`, at "
                            "its end and started again when finished, with an older export planted beside it; "
                            "then `dinolike embed RUN`",
                            "no path exports it: Ctrl-C exit 3 saying the teacher was not exported, the time limit "
                            "and the end exit 1; the older export is removed; embed refuses in one line, exit 2 "
                            "(`--allow-collapsed` embeds, naming the checkpoint it used)"),
    "embed-out": ("`dinolike embed --out` under a parent that is a file, or on a read-only filesystem",
                  "one-line error naming --out before the backbone is even loaded, exit 2"),
    "startup-signals": ("SIGTERM or Ctrl-C during `import torch` (1 process); SIGTERM while 2 processes start",
                        "one line, no traceback: SIGTERM exit 3, Ctrl-C exit 130"),
    "output-dir-in-use": ("a second `dinolike train` into the folder of a run in progress; the lock of a run "
                          "killed by SIGKILL",
                          "refused in one line naming the running process, exit 2, the first run's rows alone in "
                          "metrics.jsonl; a dead run's lock is taken over with a warning (terminal and log.txt)"),
}


def record(key: str, observed: str) -> None:
    """Note that the test of FAULTS[key] passed, with what it saw (paths shortened to their names)."""
    assert key in FAULTS, key
    path = os.environ.get("DINOLIKE_FAULT_REPORT")
    if path:
        observed = re.sub(r"/[^\s:;,()']*/([^/\s:;,()']+)", r"\1", observed)  # /tmp/.../x.pt -> x.pt
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": key, "observed": observed}) + "\n")


def render(observed: dict[str, list[str]]) -> str:
    """The markdown table: every fault, its asserted outcome, and what the suite's run observed."""
    lines = ["| fault injected | what happens (asserted by the suite) | observed in the last run |", "|---|---|---|"]
    for key, (fault, outcome) in FAULTS.items():
        seen = "; ".join(observed.get(key, [])) or "**not verified** (test failed or not run)"
        lines.append(f"| {fault} | {outcome} | {seen.replace('|', '/')} |")  # a | would split the cell
    return "\n".join(lines)
