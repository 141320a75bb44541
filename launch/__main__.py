"""`python -m launch COMMAND ...` (and `dinolike submit COMMAND ...`): see launch.submit."""

from __future__ import annotations

import sys

from .submit import main

if __name__ == "__main__":
    sys.exit(main())
