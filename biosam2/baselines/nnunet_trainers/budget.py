"""nnU-Net's own trainer with nothing changed but its budget. This folder holds only trainer classes:
nnU-Net's predictor finds a trainer by name in the folders of ``nnUNet_extTrainer``, which
:mod:`biosam2.baselines.nnunet` points here (``-tr`` only searches inside the nnunetv2 package)."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming: trainers are found by class name
    """``budget`` overrides nnU-Net's epochs (1000), iterations per epoch (250) and validation iterations
    per epoch (50); architecture, loss, optimiser, schedule and augmentation are nnU-Net's."""

    budget: dict[str, int] = {}

    # The same signature as nnUNetTrainer's: it records its __init__ arguments by name in checkpoints.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.budget.items():
            setattr(self, name, value)
