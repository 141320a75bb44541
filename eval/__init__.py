"""Checkout shims: `python -m eval knn|linear|logreg|plot|viz ...` and `python -m eval.knn ...` run the
`dinolike eval` commands (code: dinolike/eval, dinolike/commands/eval.py)."""
