"""No code path unpickles arbitrary objects: a malicious pickle is fed to every loader of biosam2;
each refuses it with a clear error and the file the pickle would create is never created."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import Sam2Model

import biosam2
from biosam2.cli import main
from biosam2.errors import BioSAM2Error, CheckpointError
from biosam2.model.artifact import CONFIG_FILE, WEIGHTS_FILE
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
    # biosam2.safetensors cannot hold a pickle (safetensors never unpickles); what an artifact can do is
    # name, in its JSON, a base-weights file anywhere on the machine, which is then read.
    biosam2.build_model("tiny", weights="random", adapter="lw").save_pretrained(tmp / "artifact")
    torch.save({"model": {"x": torch.zeros(1)}, "payload": CreatesAFile(marker)}, tmp / "elsewhere.pt")
    name_base_weights(tmp / "artifact", "official", str(tmp / "elsewhere.pt"))
    biosam2.load_model(tmp / "artifact")


def name_base_weights(artifact_directory: Path, kind: str, reference: str | None) -> None:
    """Edit an artifact's biosam2.json to name other base weights."""
    description = json.loads((artifact_directory / CONFIG_FILE).read_text())
    description["base_weights"] = {"kind": kind, "reference": reference, "seed": 0}
    (artifact_directory / CONFIG_FILE).write_text(json.dumps(description))


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
    "biosam2 artifact (base weights named in its JSON)": artifact,
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


# ---- what can really be wrong with an artifact: each refused, naming the file ---------------------
def _edit_description(change):
    def edit(directory: Path) -> Path:
        description = json.loads((directory / CONFIG_FILE).read_text())
        change(description)
        (directory / CONFIG_FILE).write_text(json.dumps(description))
        return directory / CONFIG_FILE

    return edit


def _edit_tensors(change):
    def edit(directory: Path) -> Path:
        tensors = safetensors.torch.load_file(directory / WEIGHTS_FILE)
        change(tensors)
        safetensors.torch.save_file(tensors, directory / WEIGHTS_FILE)
        return directory / WEIGHTS_FILE

    return edit


def _base(kind, reference):
    return _edit_description(lambda d: d.update(base_weights={"kind": kind, "reference": reference, "seed": 0}))


def _not_a_checkpoint(directory: Path) -> Path:
    (directory.parent / "notes.pt").write_text("hello, not weights")
    return _base("official", str(directory.parent / "notes.pt"))(directory)


def _first_integer_buffer(tensors: dict) -> str:
    return next(name for name, t in tensors.items() if name.endswith("num_batches_tracked"))


TAMPERED = {
    "base weights not on this machine": (
        _base("official", "/nowhere/sam2.1_hiera_tiny.pt"),
        "no such checkpoint file.*--weights PATH",
    ),
    "base weights as a relative path": (_base("directory", "../sam2"), "'\\.\\./sam2' is a relative path"),
    "base weights that are no checkpoint": (_not_a_checkpoint, "notes.pt: not a PyTorch checkpoint"),
    "unknown kind of base weights": (_base("ftp", "x"), "'kind' is one of random, hub, directory, official"),
    "no model options": (_edit_description(lambda d: d.pop("model")), "'model' .* is missing"),
    "no base fingerprint": (_edit_description(lambda d: d.pop("base_fingerprint")), "'base_fingerprint' is missing"),
    "unknown model option": (
        _edit_description(lambda d: d["model"].update(dropout=0.1)),
        "unknown model options: dropout",
    ),
    "invalid model option": (_edit_description(lambda d: d["model"].update(num_classes=0)), "num_classes=0"),
    "a tensor missing": (_edit_tensors(lambda t: t.pop("decoder.class_tokens")), "missing 1: decoder.class_tokens"),
    "an extra tensor": (_edit_tensors(lambda t: t.update(extra=torch.zeros(3))), "unexpected 1: extra"),
    "a tensor of the wrong shape": (
        _edit_tensors(lambda t: t.update({"decoder.class_tokens": torch.zeros(3, 256)})),
        r"wrong shape 1: decoder.class_tokens \(3, 256\) vs model \(2, 256\)",
    ),
    "integers for a float tensor": (
        _edit_tensors(lambda t: t.update({"decoder.class_tokens": t["decoder.class_tokens"].round().to(torch.int32)})),
        "wrong dtype 1: decoder.class_tokens torch.int32 vs model torch.float32",
    ),
    "floats for an integer buffer": (
        _edit_tensors(lambda t: t.update({_first_integer_buffer(t): t[_first_integer_buffer(t)].float()})),
        "wrong dtype 1: .*num_batches_tracked torch.float32 vs model torch.int64",
    ),
}


@pytest.fixture(scope="module")
def saved_artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifact") / "model"
    biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw").save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tampering", list(TAMPERED))
def test_a_tampered_artifact_is_refused_naming_the_file(saved_artifact, tmp_path, tampering):
    directory = tmp_path / "model"
    shutil.copytree(saved_artifact, directory)
    edit, message = TAMPERED[tampering]
    edited_file = edit(directory)
    with pytest.raises(CheckpointError, match=message) as error:
        biosam2.load_model(directory)
    assert str(error.value).startswith(str(edited_file)), str(error.value)


def test_other_float_precisions_load_as_the_models_dtype(saved_artifact, tmp_path):
    """A .half()/.bfloat16() model's artifact is not tampered with: its tensors are converted on loading."""
    directory = tmp_path / "model"
    shutil.copytree(saved_artifact, directory)
    _edit_tensors(lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))(directory)
    original = safetensors.torch.load_file(saved_artifact / WEIGHTS_FILE)["decoder.class_tokens"]
    loaded = biosam2.load_model(directory).decoder.class_tokens
    assert loaded.dtype == torch.float32 and torch.equal(loaded, original.half().float())


def test_predict_names_the_artifacts_base_weights_and_the_way_out(tmp_path, capsys):
    """An artifact moved to a machine where its base weights are elsewhere: one line naming biosam2.json and
    --weights; with --weights it predicts. Named weights that are a pickle never run."""
    from biosam2.data.image_io import write_image_png

    Sam2Model(get_size("tiny").transformers_config()).save_pretrained(tmp_path / "sam2")
    model = biosam2.build_model("tiny", weights=tmp_path / "sam2", adapter="lw")
    model.save_pretrained(tmp_path / "run" / "model", metadata={"normalization": {"scheme": "uint8"}})
    write_image_png(tmp_path / "in" / "a.png", np.zeros((40, 50), np.uint8))
    (tmp_path / "sam2").rename(tmp_path / "moved")
    capsys.readouterr()  # transformers' progress bars while saving

    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'run' / 'model' / CONFIG_FILE}: the base SAM2 weights it names" in err
    assert "--weights PATH" in err
    predict = ["predict", str(tmp_path / "run"), str(tmp_path / "in"), str(tmp_path / "out")]
    assert main([*predict, "--weights", str(tmp_path / "moved")]) == 0
    assert (tmp_path / "out" / "a.png").is_file()

    marker = tmp_path / "pwned"
    torch.save({"model": {}, "payload": CreatesAFile(marker)}, tmp_path / "evil.pt")
    name_base_weights(tmp_path / "run" / "model", "official", str(tmp_path / "evil.pt"))
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "in"), str(tmp_path / "out2")]) == 2
    assert "refused to load" in capsys.readouterr().err and not marker.exists()
