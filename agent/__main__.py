"""``python -m agent``: the same as ``outpost-agent``."""

import sys

from agent.cli import main

sys.exit(main())
