"""``python -m privatekeras`` is the ``privatekeras`` command (see :mod:`privatekeras.cli`)."""

import sys

from .cli import main

sys.exit(main())
