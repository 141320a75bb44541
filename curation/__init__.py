"""Checkout shim: `python -m curation STEP ...` runs `dinolike curate STEP ...` (code: dinolike/curation)."""
