"""`python -m eval.logreg ...` from a checkout: the same as `dinolike eval logreg ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["logreg", *sys.argv[1:]]))
