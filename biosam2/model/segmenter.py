"""The biosam2 segmenter: images in, one logit map per class out, at the input's own resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biosam2.errors import ConfigError
from biosam2.model.adapters import reparameterize_modules
from biosam2.model.config import ModelConfig
from biosam2.model.decoder import PromptFreeDecoder
from biosam2.model.encoder import HIERA_TOTAL_STRIDE, HieraEncoder
from biosam2.model.sam2_weights import WeightsSource

# SAM2 was trained on ImageNet-normalised RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        base_tensor_ids: set[int],
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.weights_source = weights_source
        self._base_tensor_ids = base_tensor_ids  # identities of SAM2's own tensors, to tell ours apart
        self._base_fingerprint: str | None = None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ConfigError(f"expected float images scaled to [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

        if self.config.input_size is not None:  # SAM2's own way: squash to a fixed square
            side = self.config.input_size
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        else:  # native resolution: pad with zeros (= the mean colour) to the stride Hiera needs
            pad_h = -pixels.shape[-2] % HIERA_TOTAL_STRIDE
            pad_w = -pixels.shape[-1] % HIERA_TOTAL_STRIDE
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))

        logits = self.decoder(self.encoder(pixels))  # (B, N, H'/4, W'/4)
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        if self.config.input_size is not None:
            return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    @torch.no_grad()
    def reparameterize(self) -> BioSAM2:
        """Fuse every LW adapter into a single 3x3 convolution, in place (inference form)."""
        if self.config.adapter != "lw":
            raise ConfigError(f"reparameterize() fuses LW adapters; this model has adapter={self.config.adapter!r}")
        reparameterize_modules(self)
        self.config.reparameterized = True
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder blocks in the backward pass: less memory for larger batches or images."""
        self.encoder.gradient_checkpointing = enabled

    # What is ours and what is SAM2's ------------------------------------------------------------
    def is_base_tensor(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._base_tensor_ids

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not frozen SAM2: new modules (with their buffers) and unfrozen SAM2 tensors."""
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict(keep_vars=True).items()
            if not self.is_base_tensor(tensor) or tensor.requires_grad
        }

    def frozen_base_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict(keep_vars=True).items()
            if self.is_base_tensor(tensor) and not tensor.requires_grad
        }

    def base_fingerprint(self) -> str:
        """Fingerprint of the frozen SAM2 weights (cached: frozen tensors never change)."""
        if self._base_fingerprint is None:
            from biosam2.model.sam2_weights import fingerprint

            self._base_fingerprint = fingerprint(self.frozen_base_state_dict())
        return self._base_fingerprint

    def save_pretrained(self, directory, metadata: dict | None = None) -> None:
        """Write the trained tensors (safetensors) and a JSON config naming the base SAM2 weights."""
        from biosam2.model.artifact import save_artifact

        save_artifact(self, directory, metadata)
