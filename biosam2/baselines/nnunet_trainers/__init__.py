"""nnU-Net trainer classes, found by name through nnU-Net's ``nnUNet_extTrainer`` (see :mod:`biosam2.baselines.nnunet`)."""
