"""No code path unpickles arbitrary objects: a malicious pickle is fed to every loader of biosam2;
each refuses it with a clear error and the file the pickle would create is never created."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Sam2Model

import biosam2
from biosam2.cli import main
from biosam2.errors import BioSAM2Error
from biosam2.model.artifact import WEIGHTS_FILE
from biosam2.model.sam2_sizes import get_size
from biosam2.model.sam2_weights import load_sam2


class CreatesAFile:
    """Unpickling this object would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def official_pt(tmp: Path, marker: Path) -> None:
    path = tmp / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": CreatesAFile(marker)}, path)
    load_sam2("tiny", path)


def transformers_directory(tmp: Path, marker: Path) -> None:
    directory = tmp / "sam2"
    Sam2Model(get_size("tiny").transformers_config()).save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with open(directory / "pytorch_model.bin", "wb") as stream:
        pickle.dump(CreatesAFile(marker), stream)
    load_sam2("tiny", directory)


def artifact(tmp: Path, marker: Path) -> None:
    biosam2.build_model("tiny", weights="random", adapter="lw").save_pretrained(tmp / "artifact")
    with open(tmp / "artifact" / WEIGHTS_FILE, "wb") as stream:
        pickle.dump(CreatesAFile(marker), stream)
    biosam2.load_model(tmp / "artifact")


def resume_checkpoint(tmp: Path, marker: Path) -> None:
    from biosam2.data.synthetic import write_synthetic_dataset
    from biosam2.training import TrainConfig, train

    data = write_synthetic_dataset(tmp / "data", train=2, val=1, test=1, min_side=32, max_side=48)
    config = TrainConfig(weights="random", adapter="none", epochs=1, batch_size=2, patch_size=32, num_workers=0, evaluate_test=False)
    train(data, tmp / "run", config, progress_bar=False)
    torch.save({"state_dict": {}, "payload": CreatesAFile(marker)}, tmp / "run" / "checkpoints" / "last.ckpt")
    train(data, tmp / "run", config, resume=True, progress_bar=False)


def synapse_npz(tmp: Path, marker: Path) -> None:
    import h5py

    from biosam2.data.convert import convert_dataset

    source = tmp / "synapse"
    (source / "train_npz").mkdir(parents=True)
    (source / "test_vol_h5").mkdir()
    with h5py.File(source / "test_vol_h5" / "case0001.npy.h5", "w") as volume:  # a valid test case
        volume["image"], volume["label"] = np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.uint8)
    payload = np.array([CreatesAFile(marker)], dtype=object)
    for case in ("case0005", "case0006", "case0007", "case0009"):
        np.savez(source / "train_npz" / f"{case}_slice000.npz", image=payload, label=payload)
    convert_dataset("synapse", source, tmp / "converted")


LOADERS = {
    "official SAM2 .pt": official_pt,
    "transformers directory": transformers_directory,
    "biosam2 artifact": artifact,
    "training checkpoint (--resume)": resume_checkpoint,
    "Synapse .npz slices": synapse_npz,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_pickle_is_refused_by_every_loader(loader, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(BioSAM2Error) as error:
        LOADERS[loader](tmp_path, marker)
    assert not marker.exists(), "the pickle's code ran"
    message = str(error.value)
    assert any(word in message for word in ("refused", "safetensors", "cannot be read", "not a readable")), message


def test_predict_refuses_a_tampered_artifact_on_the_command_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    model = biosam2.build_model("tiny", weights="random", adapter="lw")
    model.save_pretrained(tmp_path / "run" / "model", metadata={"normalization": {"scheme": "uint8"}})
    with open(tmp_path / "run" / "model" / WEIGHTS_FILE, "wb") as stream:
        pickle.dump(CreatesAFile(marker), stream)
    (tmp_path / "in").mkdir()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists()
