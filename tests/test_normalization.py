"""Intensity normalisation: per channel for the statistics-based schemes (as nnU-Net does)."""

from __future__ import annotations

import numpy as np
import pytest

from biosam2.data.normalization import Normalization


@pytest.mark.parametrize("scheme", ["zscore", "percentile"])
def test_each_mri_modality_gets_its_own_statistics(scheme):
    rng = np.random.default_rng(0)
    # T1, T2, FLAIR of one case: unrelated offsets and scales
    volume = np.stack([rng.normal(100, 10, (32, 32, 16)), rng.normal(1000, 150, (32, 32, 16)), rng.normal(-5, 0.5, (32, 32, 16))])
    normalised = Normalization(scheme).apply(volume)
    assert normalised.shape == volume.shape and normalised.dtype == np.float32
    means, stds = normalised.mean(axis=(1, 2, 3)), normalised.std(axis=(1, 2, 3))
    assert np.allclose(means, means[0], atol=0.05) and np.allclose(stds, stds[0], atol=0.03), (means, stds)
    if scheme == "zscore":
        assert np.allclose(stds, 1 / 6, atol=1e-3)  # +-3 SD spans [0, 1]


def test_fixed_maps_do_not_depend_on_the_other_channels():
    image = np.array([[[0, 255]], [[51, 102]]], dtype=np.uint8)  # (C=2, H=1, W=2)
    assert np.allclose(Normalization("uint8").apply(image), image / 255.0)
    ct = np.array([[[-1000.0, 0.0, 1000.0]]])
    assert np.allclose(Normalization("ct", (-100.0, 100.0)).apply(ct), [[[0.0, 0.5, 1.0]]])
