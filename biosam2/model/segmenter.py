"""The biosam2 segmenter: images in, one logit map per class out, at the input's own resolution."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from biosam2.errors import ConfigError
from biosam2.model.adapters import RepConv3x3, reparameterize_modules
from biosam2.model.artifact import save_artifact
from biosam2.model.config import ModelConfig
from biosam2.model.decoder import PromptFreeDecoder
from biosam2.model.encoder import HIERA_TOTAL_STRIDE, HieraEncoder
from biosam2.model.sam2_weights import WeightsSource

# SAM2 was trained on ImageNet-normalised RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dtype_kind(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return "floating point"
    if tensor.is_complex():
        return "complex"
    return "bool" if tensor.dtype == torch.bool else "integer"


class BioSAM2(nn.Module):
    """Prompt-free multi-class SAM2 with PEG and adapters. Build it with :func:`biosam2.build_model`.

    ``model(images)`` takes ``(B, 3, H, W)`` or ``(B, 1, H, W)`` float images scaled to [0, 1] (any H, W)
    and returns ``(B, num_classes, H, W)`` logits. Inside, the image is ImageNet-normalised, zero-padded
    at the bottom/right to a multiple of 32 (what Hiera's strides need), encoded, decoded at 1/4
    resolution, upsampled and cropped back to (H, W).
    """

    def __init__(
        self,
        config: ModelConfig,
        encoder: HieraEncoder,
        decoder: PromptFreeDecoder,
        weights_source: WeightsSource,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.weights_source = weights_source
        # State-dict names of SAM2's own tensors that stay frozen: everything else is trained. Set once
        # by factory.assemble, by name, so that it survives .to(), dtype changes, copies and compile.
        self.frozen_base_names: frozenset[str] = frozenset()
        self._base_fingerprint: str | None = None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, images: torch.Tensor, *, already_resized: bool = False) -> torch.Tensor:
        """``already_resized``: with ``input_size``, the images are at that scale already (crops cut from
        resized images, as training makes them), so they run at their own size instead of being squashed."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ConfigError(f"expected float images scaled to [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

        resize = self.config.input_size is not None and not already_resized
        if resize:  # SAM2's own way: squash to a fixed square
            side = self.config.input_size
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        else:  # native resolution: pad with zeros (= the mean colour) to the stride Hiera needs
            pad_h = -pixels.shape[-2] % HIERA_TOTAL_STRIDE
            pad_w = -pixels.shape[-1] % HIERA_TOTAL_STRIDE
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))

        logits = self.decoder(self.encoder(pixels))  # (B, N, H'/4, W'/4)
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        if resize:
            return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    @torch.no_grad()
    def reparameterize(self, inplace: bool = True) -> BioSAM2:
        """Replace every LW adapter's multi-branch block by one ``nn.Conv2d`` (the inference form).

        The fused convolution holds BatchNorm's running statistics: what the model computes in eval
        mode. In training mode BatchNorm uses each batch's own statistics instead, so fusing then would
        silently change the model's output: refused. ``inplace=False`` returns a fused copy and leaves
        this model as it is.
        """
        if self.config.adapter != "lw":
            raise ConfigError(f"reparameterize() fuses LW adapters; this model has adapter={self.config.adapter!r}")
        if any(m.training for m in self.modules() if isinstance(m, RepConv3x3)):
            raise ConfigError(
                "reparameterize() fuses with BatchNorm's running statistics, as the model computes in eval mode, "
                "but the model is in training mode (batch statistics): call model.eval() first"
            )
        model = self if inplace else copy.deepcopy(self)
        reparameterize_modules(model)
        model.config.reparameterized = True
        return model

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder blocks in the backward pass: less memory for larger batches or images."""
        self.encoder.gradient_checkpointing = enabled

    # What is ours and what is SAM2's: the one answer to "which tensors are trained" ---------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not frozen SAM2: new modules (with their buffers) and unfrozen SAM2 tensors.

        This is what artifacts and checkpoints hold, and what they are checked against when loaded.
        """
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict(keep_vars=True).items()
            if name not in self.frozen_base_names
        }

    def frozen_base_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict(keep_vars=True).items()
            if name in self.frozen_base_names
        }

    def check_trained_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> set[str]:
        """Check that ``tensors`` (of a saved artifact or checkpoint) are exactly this model's trained tensors.

        Returns the names to leave out when loading: SAM2 buffers that files written before trained
        tensors were told apart by name could carry (Module.to() replaced their objects, so they counted
        as trained). Anything else missing or unexpected is a CheckpointError naming ``source``.
        """
        from biosam2.errors import CheckpointError

        expected = self.trained_state_dict()
        names, expected_names = set(tensors), set(expected)
        buffers = {name for name, _ in self.named_buffers()}
        legacy = (names - expected_names) & self.frozen_base_names & buffers
        missing, unexpected = sorted(expected_names - names), sorted(names - expected_names - legacy)
        wrong_shape = sorted(
            f"{name} {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
            for name in names & expected_names
            if tensors[name].shape != expected[name].shape
        )
        # Another float precision is a model saved after .half()/.bfloat16(): converted on loading. Integers or
        # booleans for floats (or the reverse) would be cast silently into nonsense: refused.
        wrong_dtype = sorted(
            f"{name} {tensors[name].dtype} vs model {expected[name].dtype}"
            for name in names & expected_names
            if _dtype_kind(tensors[name]) != _dtype_kind(expected[name])
        )
        if missing or unexpected or wrong_shape or wrong_dtype:
            details = "; ".join(
                f"{label} {len(keys)}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for label, keys in (
                    ("wrong shape", wrong_shape),
                    ("wrong dtype", wrong_dtype),
                    ("missing", missing),
                    ("unexpected", unexpected),
                )
                if keys
            )
            raise CheckpointError(
                f"{source}: does not match the model it is loaded into (another adapter, SAM2 size or "
                f"number of classes?): {details}"
            )
        return legacy

    def base_fingerprint(self, leave_out: set[str] = frozenset()) -> str:
        """Fingerprint of the frozen SAM2 weights (cached: frozen tensors never change).

        ``leave_out``: names a file written before the by-name bookkeeping counted as trained; its
        recorded fingerprint was taken without them.
        """
        from biosam2.model.sam2_weights import fingerprint

        if leave_out:
            frozen = self.frozen_base_state_dict()
            return fingerprint({k: v for k, v in frozen.items() if k not in leave_out})
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(self.frozen_base_state_dict())
        return self._base_fingerprint

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/.cuda() all come here: fingerprint the frozen weights as loaded, before a
        # lower-precision copy could round them and make the artifact's base look like another one.
        if self.frozen_base_names and self._base_fingerprint is None:
            self.base_fingerprint()
        return super()._apply(fn, recurse)

    def save_pretrained(self, directory, metadata: dict | None = None) -> None:
        """Write the trained tensors (safetensors) and a JSON config naming the base SAM2 weights."""
        save_artifact(self, directory, metadata)
