"""``python -m mailhub.cli``: the ``mailhub`` command."""

import sys

from mailhub.cli import main

sys.exit(main())
