"""Data curation in the style of DINOv2's LVD-142M: embed, deduplicate, retrieve, sample, build a manifest.

Run as `python -m curation STEP --config configs/curation/fmnist_demo.yaml [key=value ...]`.
"""
