"""`python -m dinolike.bench ...`: the same as `dinolike bench ...`."""

import sys

from dinolike.bench.command import main

sys.exit(main())
