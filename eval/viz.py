"""`python -m eval.viz ...` from a checkout: the same as `dinolike eval viz ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["viz", *sys.argv[1:]]))
