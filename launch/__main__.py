"""`python -m launch COMMAND ...` from a checkout: the same as `dinolike submit COMMAND ...`."""

import sys

from dinolike.commands.submit import main

if __name__ == "__main__":
    sys.exit(main())
