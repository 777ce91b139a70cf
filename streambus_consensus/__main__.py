"""``python -m streambus_consensus`` runs the console script."""

import sys

from .cli import main

sys.exit(main())
