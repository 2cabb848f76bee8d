"""``python -m biosam2.bench.accuracy``: what the ``--gpus`` workers run (with ``--run-cell``);
the same as ``biosam2 bench accuracy``."""

import sys

from biosam2.cli import main

sys.exit(main(["bench", "accuracy", *sys.argv[1:]]))
