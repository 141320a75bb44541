"""The whole flow as one command (`dinolike pipeline`): the library half.

Config (`config.py`), fingerprints (`fingerprint.py`), per-stage state and `lineage.json` (`lineage.py`) and
`report.md` (`report.py`) know nothing of the commands; the stage runners that call `dinolike curate`,
`train`, `distill` and `eval` live with the commands (`dinolike/commands/pipeline*.py`).
"""
