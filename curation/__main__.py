"""`python -m curation STEP --config ...` from a checkout: the same as `dinolike curate STEP --config ...`."""

from dinolike.commands.curate import main

if __name__ == "__main__":
    raise SystemExit(main())
