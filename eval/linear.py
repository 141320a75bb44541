"""`python -m eval.linear ...` from a checkout: the same as `dinolike eval linear ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["linear", *sys.argv[1:]]))
