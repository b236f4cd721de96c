"""``python -m clients``: the ``isoquant`` command (see clients/cli.py)."""

import sys

from clients.cli import main

sys.exit(main())
