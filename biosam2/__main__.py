"""``python -m biosam2``: the command line, as launchers such as ``torchrun -m biosam2 train ...`` start it."""

from biosam2.cli import console_main

if __name__ == "__main__":
    console_main()
