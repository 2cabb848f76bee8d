"""``python -m biosam2.bench.accuracy``: what the ``--gpus`` workers run (with ``--run-cell``)."""

import sys

from biosam2.bench.accuracy.cli import main

sys.exit(main())
