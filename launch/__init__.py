"""Checkout shim: `python -m launch COMMAND ...` runs `dinolike submit COMMAND ...` (code: dinolike/launch)."""
