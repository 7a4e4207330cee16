"""``python -m outpostctl``: the same as the ``outpostctl`` command."""

import sys

from outpostctl.cli import main

sys.exit(main())
