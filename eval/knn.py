"""`python -m eval.knn ...` from a checkout: the same as `dinolike eval knn ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(["knn", *sys.argv[1:]]))
