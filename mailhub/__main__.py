"""``python -m mailhub``: the ``mailhub`` command, for when the console script is not installed."""

import sys

from mailhub.cli import main

sys.exit(main())
