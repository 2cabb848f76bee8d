"""ONNX export and the ONNX Runtime engine: the same logits, labels and files as the PyTorch engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import biosam2
from biosam2.cli import main
from biosam2.data.image_io import read_image, read_label
from biosam2.data.normalization import Normalization
from biosam2.data.synthetic import synthetic_image, write_synthetic_dataset
from biosam2.deploy.export import export_onnx, sidecar_path
from biosam2.deploy.onnx_engine import OnnxModel
from biosam2.errors import CheckpointError, ConfigError
from biosam2.inference.predict_files import predict_files
from biosam2.model.adapters import ModulatedDeformableConv
from biosam2.model.factory import load_model
from biosam2.training import TrainConfig, train
from conftest import perturb_every_tensor

ort = pytest.importorskip("onnxruntime")

SIZES = [(33, 47), (97, 211), (256, 256), (512, 384), (1000, 120)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny LW model trained briefly on the synthetic data (grey): its logits have real margins,
    unlike random weights' near ties, so that agreeing labels mean something."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_synthetic_dataset(root / "data", train=3, val=1, test=2, min_side=64, max_side=96)
    config = TrainConfig(weights="random", adapter="lw", epochs=4, batch_size=2, patch_size=64, lr=3e-3, loss="dice_ce",
                         num_workers=0, overlays=0, evaluate_test=False)
    train(data, root / "run", config, progress_bar=False)
    return root / "run"


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory) -> tuple[torch.nn.Module, OnnxModel]:
    model = load_model(trained_run / "model").eval()
    path = tmp_path_factory.mktemp("onnx") / "grey.onnx"
    assert main(["export", str(trained_run), str(path)]) == 0
    return model, OnnxModel(path)


@pytest.fixture(scope="module")
def colour(tmp_path_factory) -> tuple[torch.nn.Module, OnnxModel]:
    """An RGB LW model with every tensor off its init value (exported fused)."""
    model = perturb_every_tensor(biosam2.build_model("tiny", weights="random", num_classes=3, adapter="lw")).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "rgb.onnx", channels=3)
    return model, OnnxModel(path)


def synthetic_batch(batch: int, height: int, width: int, channels: int) -> torch.Tensor:
    rng = np.random.default_rng(height * width + batch)
    images = [synthetic_image(rng, height, width)[0] for _ in range(batch)]
    array = np.stack(images).astype(np.float32)[:, None] / 255.0
    return torch.from_numpy(np.repeat(array, channels, axis=1) if channels == 3 else array)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("which", ["trained", "colour"])
def test_onnxruntime_logits_equal_pytorch_at_every_size(which, batch, request):
    """Within 1e-4; and the trained model's labels agree on >= 99.99% of the pixels."""
    model, engine = request.getfixturevalue(which)
    same = total = 0
    for height, width in SIZES:
        images = synthetic_batch(batch, height, width, engine.channels)
        if which == "colour":  # colour that is not grey
            images = images * torch.tensor([1.0, 0.7, 0.4]).reshape(1, 3, 1, 1)
        with torch.no_grad():
            expected = model(images)
        got = engine(images)
        assert got.shape == expected.shape == (batch, model.num_classes, height, width)
        difference = (got - expected).abs().max().item()
        assert difference <= 1e-4, f"{which} {batch}x{height}x{width}: max |ORT - PyTorch| = {difference}"
        if which == "trained":
            labels = expected.argmax(1)
            assert len(labels.unique()) > 1  # a model that predicts one class everywhere would agree trivially
            same += int((got.argmax(1) == labels).sum())
            total += labels.numel()
    assert which != "trained" or same / total >= 0.9999, f"labels agree on {same} of {total} pixels"


def test_exported_model_is_fused_and_the_sidecar_says_what_is_outside_the_graph(trained_run, trained):
    import onnx

    _, engine = trained
    graph = onnx.load(str(engine.path)).graph
    operators = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in operators  # LW branches fused into single convolutions
    assert {"Pad", "Slice", "Sub", "Div"} <= operators  # stride padding, crop back, ImageNet normalisation
    sidecar = json.loads(sidecar_path(engine.path).read_text())
    assert sidecar["class_names"] == ["background", "cell", "nucleus", "fibre"]
    assert sidecar["normalization"] == {"scheme": "uint8"}
    assert sidecar["channels"] == 1 and sidecar["channel_names"] == {"0": "microscopy"}
    assert sidecar["biosam2_version"] == biosam2.__version__
    assert sidecar["model"]["reparameterized"] is True and sidecar["model"]["adapter"] == "lw"


@pytest.mark.parametrize("output", ["probabilities", "labels"])
def test_output_heads(trained, trained_run, tmp_path, output):
    model, _ = trained
    path = tmp_path / f"{output}.onnx"
    assert main(["export", str(trained_run), str(path), "--output", output]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = synthetic_batch(2, 97, 211, 1)
    got = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        logits = model(images)
    if output == "labels":
        assert got.dtype == np.uint8 and got.shape == (2, 97, 211)
        assert (got == logits.argmax(1).numpy()).mean() >= 0.9999
    else:
        np.testing.assert_allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="--output logits"):
        OnnxModel(path)


def test_int8_export_keeps_the_labels_of_the_trained_model(trained, trained_run, tmp_path):
    model, fp32 = trained
    path = tmp_path / "int8.onnx"
    assert main(["export", str(trained_run), str(path), "--int8"]) == 0
    engine = OnnxModel(path)
    assert engine.description["quantization"] == "int8-dynamic-matmul"
    assert path.stat().st_size < 0.5 * fp32.path.stat().st_size  # the MatMul weights are int8 in the file
    assert not list(tmp_path.glob("*.fp32.onnx"))
    images = synthetic_batch(3, 97, 211, 1)
    with torch.no_grad():
        labels = model(images).argmax(1)
    assert (engine(images).argmax(1) == labels).float().mean().item() >= 0.99


def test_deformable_convolution_exports_as_onnx_deformconv(tmp_path):
    """The symbolic for torchvision::deform_conv2d: offsets and modulation far from their init values."""
    torch.manual_seed(0)
    module = ModulatedDeformableConv(8).eval()
    torch.nn.init.normal_(module.offset_and_mask.weight, std=0.3)
    torch.nn.init.normal_(module.offset_and_mask.bias, std=1.0)
    from biosam2.deploy.export import OPSET, _register_symbolics

    _register_symbolics()
    path = tmp_path / "dcn.onnx"
    torch.onnx.export(module, (torch.rand(1, 8, 12, 16),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    x = torch.rand(2, 8, 19, 23)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-5)


def test_hp_model_exports_through_deformconv(tmp_path):
    model = perturb_every_tensor(biosam2.build_model("tiny", weights="random", num_classes=3, adapter="hp")).eval()
    for module in model.modules():  # offsets of a pixel or so, modulation far from uniform
        if isinstance(module, ModulatedDeformableConv):
            torch.nn.init.normal_(module.offset_and_mask.weight, std=0.05)
            torch.nn.init.normal_(module.offset_and_mask.bias, std=1.0)
    engine = OnnxModel(export_onnx(model, tmp_path / "hp.onnx", channels=3))
    import onnx

    assert "DeformConv" in {node.op_type for node in onnx.load(str(engine.path)).graph.node}
    images = torch.rand(2, 3, 97, 211)
    with torch.no_grad():
        expected = model(images)
    assert (engine(images) - expected).abs().max().item() <= 1e-4


def test_a_failed_export_leaves_the_earlier_file_and_sidecar_as_they_were(colour, tmp_path, monkeypatch):
    model, _ = colour
    path = export_onnx(model, tmp_path / "model.onnx", channels=3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def dies_half_way(graph, args, target, **options):
        Path(target).write_bytes(b"half an onnx file")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch.onnx, "export", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        export_onnx(model, path, channels=3, output="probabilities")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    assert OnnxModel(path).description["output"]["kind"] == "logits"


def test_input_size_models_are_refused_and_native_ones_are_not(tmp_path):
    model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw", input_size=256).eval()
    with pytest.raises(ConfigError, match="input_size=256.*_upsample_bilinear2d_aa"):
        export_onnx(model, tmp_path / "resized.onnx", channels=3)
    assert not (tmp_path / "resized.onnx").exists()


def test_predict_with_onnxruntime_writes_what_pytorch_writes(trained_run, trained, tmp_path):
    """PNG label maps and probabilities through the command line, a NIfTI volume with its geometry,
    and a huge image predicted in tiles, with both engines."""
    _, engine = trained
    images = trained_run.parent / "data" / "imagesTs"
    for name in ("pytorch", "onnxruntime"):
        source = engine.path if name == "onnxruntime" else trained_run
        assert main(["predict", str(source), str(images), str(tmp_path / name), "--probabilities", "--engine", name,
                     "--device", "cpu"]) == 0
    for label_map in sorted((tmp_path / "pytorch").glob("*.png")):
        assert np.array_equal(read_label(label_map).array, read_label(tmp_path / "onnxruntime" / label_map.name).array)
        probabilities = label_map.with_name(label_map.stem + "_probabilities.npy")
        np.testing.assert_allclose(np.load(probabilities), np.load(tmp_path / "onnxruntime" / probabilities.name), atol=1e-5)

    rng = np.random.default_rng(0)
    volume = np.stack([synthetic_image(rng, 70, 90)[0] for _ in range(3)], axis=-1)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (10, -20, 5)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "in" / "vol.nii.gz")
    huge = synthetic_image(rng, 150, 260)[0]
    from PIL import Image

    Image.fromarray(huge).save(tmp_path / "in" / "huge.png")
    model = load_model(trained_run / "model")
    options = {"normalization": Normalization("uint8"), "device": "cpu", "max_side": 128, "tile_size": 96,
               "probabilities": True, "channel_names": {"0": "microscopy"}}
    predict_files(model, tmp_path / "in", tmp_path / "pt-files", **options)
    predict_files(engine, tmp_path / "in", tmp_path / "ort-files", **options)
    ours, theirs = nib.load(tmp_path / "ort-files" / "vol.nii.gz"), nib.load(tmp_path / "pt-files" / "vol.nii.gz")
    assert np.array_equal(ours.affine, nib.load(tmp_path / "in" / "vol.nii.gz").affine) and np.array_equal(ours.get_fdata(), theirs.get_fdata())
    tiled = read_image(tmp_path / "ort-files" / "huge.png").array
    assert tiled.shape == huge.shape
    assert (tiled == read_image(tmp_path / "pt-files" / "huge.png").array).mean() >= 0.9999


def test_onnx_engine_refusals(trained, tmp_path, monkeypatch, capsys):
    _, engine = trained
    with pytest.raises(ConfigError, match="runs on the CPU"):
        engine.to("cuda")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(engine.path.read_bytes())
    with pytest.raises(CheckpointError, match="lonely.json: missing"):
        OnnxModel(lonely)
    assert main(["predict", str(engine.path), str(tmp_path), str(tmp_path / "out"), "--engine", "onnxruntime", "--tta"]) == 2
    assert "--tta and --ensemble run with the PyTorch engine" in capsys.readouterr().err
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(engine.path.read_bytes()[:1000])
    sidecar_path(damaged).write_text(sidecar_path(engine.path).read_text())
    with pytest.raises(CheckpointError, match="damaged.onnx: onnxruntime .* cannot load it"):
        OnnxModel(damaged)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"biosam2\[deploy\]"):
        OnnxModel(engine.path)
    assert main(["predict", str(engine.path), str(tmp_path), str(tmp_path / "out")]) == 2  # .onnx without --engine
    assert "an ONNX file runs with --engine onnxruntime" in capsys.readouterr().err



def test_on_isbi_2012_both_engines_give_the_same_miou_to_4_decimals(tmp_path):
    from conftest import SHARED_DATA, require_shared

    source = require_shared(SHARED_DATA / "isbi2012")
    data, run = tmp_path / "isbi", tmp_path / "run"
    assert main(["convert", "isbi2012", str(source), str(data), "--limit", "3"]) == 0
    options = ["--weights", "random", "--adapter", "lw", "--epochs", "1", "--batch-size", "2", "--patch-size", "128",
               "--lr", "3e-3", "--limit-train-batches", "6", "--num-workers", "0", "--no-test", "--no-progress"]
    assert main(["train", str(data), "--out", str(run), *options]) == 0
    miou = {}
    for engine in ("pytorch", "onnxruntime"):
        predictions = tmp_path / f"pred-{engine}"
        assert main(["predict", str(run), str(data / "imagesTs"), str(predictions), "--engine", engine]) == 0
        assert main(["evaluate", str(predictions), str(data / "labelsTs"), "--out", str(tmp_path / f"ev-{engine}")]) == 0
        miou[engine] = json.loads((tmp_path / f"ev-{engine}" / "evaluation.json").read_text())["miou"]
    assert round(miou["onnxruntime"], 4) == round(miou["pytorch"], 4), miou
