"""`python -m edgerun.scheduler`: the `edgerun` command."""

import sys

from edgerun.cli.main import main

sys.exit(main())
