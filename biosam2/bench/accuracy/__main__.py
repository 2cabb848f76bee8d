"""``python -m biosam2.bench.accuracy``: what the ``--gpus`` workers run (with ``--run-cell``);
the same as ``biosam2 bench accuracy``."""

import signal
import sys

# A grid started in the background (nohup ... &) runs with SIGINT ignored, and its workers inherit
# that; the launcher stops them with one SIGINT each, so a worker always takes SIGINT as Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)

from biosam2.cli import main  # noqa: E402  (after the signal handler: an early stop is a Ctrl-C too)

sys.exit(main(["bench", "accuracy", *sys.argv[1:]]))
