"""Data curation in the style of DINOv2's LVD-142M: embed, deduplicate, retrieve, sample, build a manifest.

Each step is a library function taking the merged curation config (`run_step(cfg, step)`); the command
`dinolike curate STEP --config configs/curation/X.yaml [key=value ...]` parses and calls it.
"""
