"""`python -m edgerun.scheduler`: the `edgerun` command."""

import sys

from .cli import main

sys.exit(main())
