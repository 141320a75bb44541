"""The whole flow as one job (`dinolike pipeline`): curate -> pretrain -> high-res -> distill -> eval.

`run.py` runs the stages here, each the job of an existing command called in this process (`stages.py`);
config (`config.py`), fingerprints (`fingerprint.py`), per-stage state and `lineage.json` (`lineage.py`) and
`report.md` (`report.py`) are its bookkeeping. The command shell and the SLURM submission of the stages
are `dinolike/commands/pipeline.py` and `pipeline_submit.py`.
"""
