"""Inference: native-resolution prediction of images and volumes, tiled for very large images."""

from biosam2.inference.predictor import Predictor

__all__ = ["Predictor"]
