"""nnU-Net's own trainer with nothing changed but its budget. This folder holds only trainer classes:
nnU-Net finds a trainer by name in the folders of ``nnUNet_extTrainer`` (``-tr`` alone searches only
inside the nnunetv2 package), which :mod:`biosam2.baselines.nnunet` points here. nnU-Net imports this
file itself, so the budget comes from environment variables, which also work with its own command line:

    nnUNet_extTrainer=<this folder> BIOSAM2_NNUNET_EPOCHS=12 BIOSAM2_NNUNET_ITERATIONS=5 \
        nnUNetv2_train 1 2d 0 -tr nnUNetTrainerBudget
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# nnU-Net's attribute -> the variable that overrides it (nnU-Net's defaults: 1000, 250, 50)
BUDGET_VARIABLES = {"num_epochs": "BIOSAM2_NNUNET_EPOCHS", "num_iterations_per_epoch": "BIOSAM2_NNUNET_ITERATIONS",
                    "num_val_iterations_per_epoch": "BIOSAM2_NNUNET_VAL_ITERATIONS"}


class nnUNetTrainerBudget(nnUNetTrainer):
    """Epochs, iterations per epoch and validation iterations per epoch from the environment; the
    architecture, loss, optimiser, schedule and augmentation are nnU-Net's."""

    # The same signature as nnUNetTrainer's: it records its __init__ arguments by name in checkpoints.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - nnUNetTrainer's default
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, variable in BUDGET_VARIABLES.items():
            if os.environ.get(variable):
                setattr(self, attribute, int(os.environ[variable]))
