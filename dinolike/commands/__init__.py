"""The commands of `dinolike` that ship with the library: `train` / `distill` and `export`.

They stand on the command floor, next to `eval/`, `curation/` and `launch/` (see `dinolike/cli.py`, the
one entry point): commands may import the library and each other, the library never imports them.
"""
