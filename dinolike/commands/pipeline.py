"""`dinolike pipeline --config configs/pipeline/X.yaml [key=value ...] [--submit [--wait]]`.

The whole flow in one command: curate -> pretrain -> high-res -> distill -> eval, each stage the job of an
existing command run on the previous stage's output (dinolike/pipeline/run.py). Run it again and finished
stages are skipped (same fingerprint: same resolved config and inputs); the unfinished one resumes from its
checkpoint (training) or its finished steps (curation, eval); a stage whose config or inputs changed reruns
from scratch, and so does every stage after it. `--submit` runs each stage as a SLURM job instead (see
pipeline_submit.py). Writes, in output_dir: one folder per stage, stages/<stage>.json, lineage.json,
report.md, report/*.png.
"""

from __future__ import annotations

import argparse
import sys

from yaml import YAMLError

from dinolike.config import ConfigError
from dinolike.pipeline.config import STAGES, load_pipeline
from dinolike.pipeline.run import run_local
from dinolike.pipeline.stages import StageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinolike pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pipeline yaml (a delta on configs/pipeline/base.yaml)")
    p.add_argument("--submit", action="store_true", help="run each stage as a SLURM job (dependent jobs)")
    p.add_argument("--wait", action="store_true", help="--submit: wait for the jobs and return their status")
    p.add_argument("--stage", choices=STAGES, help="run only this stage (what each submitted job runs); "
                   "the stages it reads must have finished")
    p.add_argument("overrides", nargs="*", help="pipeline keys (output_dir=..., stages=[...]) or "
                   "STAGE.KEY=VALUE for a stage's command (pretrain.optim.epochs=3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_pipeline(args.config, args.overrides)
        if args.stage is not None and args.stage not in cfg.stages:
            raise ConfigError(f"--stage {args.stage}: not among this pipeline's stages {list(cfg.stages)}")
        if args.wait and not args.submit:
            raise ConfigError("--wait goes with --submit (without it the stages run here, and the command waits)")
        if args.stage is not None and args.submit:
            raise ConfigError("--stage runs one stage here (what each submitted job does); drop it with --submit")
        if args.submit:
            from dinolike.commands.pipeline_submit import submit_pipeline

            return submit_pipeline(cfg, args.config, args.overrides, args.wait)
        return run_local(cfg, args.config, args.stage)
    except (ConfigError, StageError, FileNotFoundError, YAMLError) as e:
        print(f"dinolike pipeline: error: {e}", file=sys.stderr)
        return 2
