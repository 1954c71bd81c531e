"""`python -m autoexperts` runs the `autoexperts` command."""

import sys

from .cli import main

sys.exit(main())
