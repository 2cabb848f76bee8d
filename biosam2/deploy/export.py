"""``biosam2 export``: a trained model as one ONNX file that holds the whole forward pass.

Inside the graph: grey-to-RGB expansion, ImageNet normalisation, zero padding to Hiera's stride
(or, for ``input_size`` models, the antialiased resize to SAM2's square), the encoder and decoder, the
upsampling and the crop back to the input's (H, W); then, as asked, softmax or argmax. Batch, height
and width are dynamic.

Outside the graph: the run's intensity normalisation (uint8 scaling, CT window, per-image z-score or
percentiles), recorded in the sidecar JSON. The graph's input is what ``Normalization.apply`` gives:
float images scaled to [0, 1]. Per-image statistics computed in the graph would be wrong on tiles
(tiled prediction of huge images needs the whole image's statistics), and percentiles have no ONNX
operator, so the normalisation stays in the one place that already does it for the PyTorch engine.

Exporter: PyTorch's TorchScript-based one (``dynamo=False``). It exports dynamic batch/H/W of the
fused LW model and takes a custom symbolic for ``torchvision::deform_conv2d``; the dynamo exporter
failed on a batch-size guard in the first trial (issue 13).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from biosam2.atomic_io import atomic_output, atomic_write_text
from biosam2.errors import ConfigError

OUTPUTS = ("logits", "probabilities", "labels")
OPSET = 19  # the first with DeformConv
SIDECAR_FORMAT = "biosam2-onnx"


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``: the sidecar's one place."""
    return Path(onnx_path).with_suffix(".json")


class ExportedGraph(nn.Module):
    """The model plus the output head the file is asked to end with."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        if self.output == "probabilities":
            return torch.softmax(logits, dim=1)
        if self.output == "labels":
            labels = logits.argmax(1)
            return labels.to(torch.uint8) if logits.shape[1] <= 256 else labels.to(torch.int32)
        return logits


def _deform_conv2d_symbolic(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                            dil_h, dil_w, n_weight_grps, n_offset_grps, use_mask):
    """``torchvision::deform_conv2d`` -> ONNX ``DeformConv`` (opset 19): same inputs, attributes as ints."""
    from torch.onnx import symbolic_helper as sym

    def value(v):
        return sym._get_const(v, "i", "int")

    kernel = sym._get_tensor_sizes(weight)[-2:]
    inputs = [input, weight, offset, bias]
    if value(use_mask):
        inputs.append(mask)
    return g.op(
        "DeformConv", *inputs,
        dilations_i=[value(dil_h), value(dil_w)], group_i=value(n_weight_grps), offset_group_i=value(n_offset_grps),
        kernel_shape_i=kernel, pads_i=[value(pad_h), value(pad_w), value(pad_h), value(pad_w)],
        strides_i=[value(stride_h), value(stride_w)],
    )


def _register_symbolics() -> None:
    import torchvision  # noqa: F401  (registers the torchvision ops)

    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d_symbolic, OPSET)


def prepare_model(model: nn.Module) -> nn.Module:
    """Eval mode; LW adapters fused (what inference computes, one convolution per adapter)."""
    model = model.eval()
    if model.config.adapter == "lw" and not model.config.reparameterized:
        model = model.reparameterize(inplace=False)
    return model


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    channels: int,
    output: str = "logits",
    metadata: dict[str, Any] | None = None,
    int8: bool = False,
) -> Path:
    """Write ``model`` (a BioSAM2) as ONNX to ``path`` and its sidecar JSON beside it; returns the path.

    ``channels``: 1 (grey) or 3 (RGB), what the run was trained on. ``metadata``: the artifact's
    (normalisation, labels, channel names), copied into the sidecar. ``int8``: ONNX Runtime's dynamic
    int8 quantisation of the MatMul weights (the attention and MLP layers: most of the time); on the
    benchmark's trained model faster and with the same labels as fp32 on >= 99% of pixels, not 99.99%.
    """
    from biosam2 import __version__

    path = Path(path)
    if output not in OUTPUTS:
        raise ConfigError(f"--output {output}: choose one of {', '.join(OUTPUTS)}")
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels}: biosam2 models take 1 (grey) or 3 (colour) channels")
    if path.suffix != ".onnx":
        raise ConfigError(f"{path}: the output file must end in .onnx")
    if model.config.input_size is not None:
        # F.interpolate(antialias=True) is aten::_upsample_bilinear2d_aa, which the TorchScript exporter
        # cannot export and ONNX Resize (antialias=1) does not compute alike: refused, not approximated.
        raise ConfigError(
            f"this model resizes to input_size={model.config.input_size} with antialiasing, which ONNX export "
            "does not support (aten::_upsample_bilinear2d_aa); only native-resolution models (no input_size) can be exported"
        )
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ConfigError("biosam2 export needs the onnx package: pip install 'biosam2[deploy]'") from None
    _register_symbolics()
    model = prepare_model(model).float().cpu()
    graph = ExportedGraph(model, output)
    example = torch.rand(1, channels, 64, 96)
    axes = {0: "batch", 2: "height", 3: "width"}
    # Written under a temporary name and moved in whole: a failed or killed export leaves an earlier
    # file and its sidecar as they were. The old sidecar goes just before the move, so a kill between
    # the move and the new sidecar leaves a file without one, which the engine refuses.
    with atomic_output(path, suffix=".onnx") as staged, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values: all are checked by tests
        torch.onnx.export(
            graph, (example,), str(staged), dynamo=False, opset_version=OPSET,
            input_names=["images"], output_names=[output],
            dynamic_axes={"images": axes, output: axes if output != "labels" else {0: "batch", 1: "height", 2: "width"}},
        )
        if int8:
            _quantize(staged)
        sidecar_path(path).unlink(missing_ok=True)
    metadata = metadata or {}
    labels = metadata.get("labels") or {}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "biosam2_version": __version__,
        "input": {"name": "images", "shape": ["batch", channels, "height", "width"], "dtype": "float32",
                  "scaled": "to [0, 1] by the normalization below"},
        "output": {"name": output, "kind": output},
        "channels": channels,
        "channel_names": metadata.get("channel_names"),
        "class_names": [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])] or None,
        "labels": labels or None,
        "num_classes": model.config.num_classes,
        "normalization": metadata.get("normalization"),
        "postprocessing": metadata.get("postprocessing"),  # applied by predict after the graph, as for PyTorch
        "model": model.config.to_dict(),
        "opset": OPSET,
        "quantization": "int8-dynamic-matmul" if int8 else None,
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return path


def _quantize(path: Path) -> None:
    import logging

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ConfigError("biosam2 export --int8 needs onnxruntime: pip install 'biosam2[deploy]'") from None
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    path.replace(fp32)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process for static quantisation does not apply
    try:
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        logging.getLogger().setLevel(quiet)
        fp32.unlink()


def channels_of(metadata: dict[str, Any]) -> int:
    """The channels a run was trained on: its channel names, 3 for a colour (R, G, B) dataset."""
    from biosam2.data.dataset_format import is_colour

    names = metadata.get("channel_names")
    if not names:
        return 3
    return 3 if is_colour(names) else len(names)
