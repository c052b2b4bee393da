"""``python -m failover_backend``."""

import sys

from .cli import main

sys.exit(main(prog="python -m failover_backend"))
