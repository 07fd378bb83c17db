"""PyInstaller's entry script for the one-file agent: exactly `edgerun-agent`."""

import sys

from edgerun.agent.main import main

sys.exit(main())
