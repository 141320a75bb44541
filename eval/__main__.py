"""`python -m eval PROTOCOL ...` from a checkout: the same as `dinolike eval PROTOCOL ...`."""

import sys

from dinolike.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
