"""Errors that biosam2 raises on bad input.

Every message names the file (or object) and what is wrong with it, and says how to fix it where
there is a fix. The command line prints these messages without a traceback (unless ``--debug``).
"""

from __future__ import annotations


class BioSAM2Error(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug in biosam2."""


class CheckpointError(BioSAM2Error):
    """A SAM2 checkpoint or a biosam2 artifact cannot be used."""


class DataError(BioSAM2Error):
    """A dataset, image, volume or label map cannot be used."""


class ConfigError(BioSAM2Error):
    """An option or configuration value is invalid."""


class TrainingDiverged(BioSAM2Error):
    """Training produced NaN or Inf values (usually a learning rate that is too high)."""
