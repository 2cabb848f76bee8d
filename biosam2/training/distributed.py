"""Which process of a multi-process run this is, known before Lightning starts.

Lightning's DDP launcher re-runs the whole ``biosam2 train ...`` command for ranks >= 1 (with
``LOCAL_RANK``/``NODE_RANK`` set), and ``torchrun``/SLURM start every rank at once (``RANK``,
``SLURM_PROCID``). Everything ``train`` does before ``Trainer.fit`` runs in all of them, so what may be
done only once (refusing an existing run directory, creating it, writing its files) asks this first.
"""

from __future__ import annotations

import os

# Set by torchrun (RANK, LOCAL_RANK, GROUP_RANK), SLURM (SLURM_PROCID) and Lightning's own launcher
# (LOCAL_RANK, NODE_RANK) in every process but the first.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """True in the process the user started, or in global rank 0 of a launcher that starts them all."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True

