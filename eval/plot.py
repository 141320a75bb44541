"""`python -m eval.plot ...` from a checkout: the same as `dinolike eval plot ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
