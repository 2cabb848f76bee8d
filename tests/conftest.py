"""Shared test helpers: where the real data lives, and small builders used by several test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BIOSAM2_SHARED", REPO_ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"


def require_shared(path: Path) -> Path:
    """Skip the calling test, saying why, when a folder of ../shared is not on this machine."""
    if not path.exists():
        pytest.skip(f"{path} is not available (real data and fixtures live in ../shared beside the repository)")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def official_keys(size: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every entry of Meta's official sam2.1 checkpoint of this size."""
    table = require_shared(FIXTURES) / f"sam2.1_hiera_{size.replace('-', '_')}.pt.keys.tsv"
    rows = []
    for line in table.read_text().splitlines()[1:]:
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.split("x")) if shape else (), dtype))
    return rows


def write_official_checkpoint(size: str, path: Path, *, drop: tuple[str, ...] = (), seed: int = 0) -> dict:
    """An official-format ``.pt`` (``{"model": state_dict}``) with exactly the fixture's names, shapes
    and dtypes and random values; returns the state dict written."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))
        for name, shape, dtype in official_keys(size)
        if name not in drop
    }
    torch.save({"model": state}, path)
    return state


def perturb_every_tensor(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add seeded noise to every parameter and floating-point buffer, in place, so that no tensor sits at
    its init value (zeros and ones would hide a tensor that is read in the wrong place, or not at all)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            before = tensor.clone()
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
            assert not torch.equal(tensor, before), f"{name} kept its init value"
    return model
