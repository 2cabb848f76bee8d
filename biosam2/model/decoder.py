"""SAM2's frozen mask decoder driven without prompts, extended to one mask per class.

- The frozen prompt encoder is called with SAM2's own "no prompt" input (one padding point labelled
  -1), and its "no mask" dense embedding is broadcast to the feature grid.
- The decoder's output tokens are SAM2's object-score and IoU tokens followed by one learned mask
  token per class; each class has its own hypernetwork MLP. Class ``c`` is initialised from SAM2's
  pretrained mask token and MLP number ``c mod 4``, so training starts from SAM2's mask heads.
- The image positional encoding (SAM2's random Fourier features) is generated for the actual feature
  grid, so any image size and aspect ratio works.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2Model


class PromptFreeDecoder(nn.Module):
    """FPN features at strides 4, 8, 16 -> (B, num_classes, H/4, W/4) logits."""

    def __init__(self, sam2: Sam2Model, num_classes: int):
        super().__init__()
        self.mask_decoder = sam2.mask_decoder
        self.prompt_encoder = sam2.prompt_encoder
        self.fourier_embedding = sam2.shared_image_embedding
        self.no_memory_embedding = sam2.no_memory_embedding  # SAM2's "image without memory" marker
        pretrained_tokens = self.mask_decoder.mask_tokens.weight
        pretrained_mlps = self.mask_decoder.output_hypernetworks_mlps
        sources = [c % pretrained_tokens.shape[0] for c in range(num_classes)]
        self.class_tokens = nn.Parameter(pretrained_tokens.detach()[sources].clone())
        self.class_mlps = nn.ModuleList(copy.deepcopy(pretrained_mlps[s]) for s in sources)
        self.class_mlps.requires_grad_(True)
        self.num_classes = num_classes

    def image_positional_encoding(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """SAM2's image-wide positional encoding for an arbitrary (height, width) grid: (1, C, h, w)."""
        ys = (torch.arange(height, device=like.device, dtype=like.dtype) + 0.5) / height
        xs = (torch.arange(width, device=like.device, dtype=like.dtype) + 0.5) / width
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.fourier_embedding(grid).permute(2, 0, 1).unsqueeze(0)

    def no_prompt_embeddings(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """The frozen prompt encoder's sparse embedding for "no prompt": (B, 1, tokens, C)."""
        points = torch.zeros(batch_size, 1, 1, 2, device=like.device, dtype=like.dtype)
        labels = -torch.ones(batch_size, 1, 1, device=like.device, dtype=torch.int32)
        sparse, _ = self.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
        return sparse

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        decoder = self.mask_decoder
        stride4, stride8, embedding = features
        stride4 = decoder.conv_s0(stride4)
        stride8 = decoder.conv_s1(stride8)
        batch_size, channels, height, width = embedding.shape
        embedding = embedding + self.no_memory_embedding.reshape(1, -1, 1, 1)
        embedding = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

        output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, self.class_tokens])
        output_tokens = output_tokens.to(embedding.dtype).expand(batch_size, 1, -1, -1)
        tokens = torch.cat([output_tokens, self.no_prompt_embeddings(batch_size, embedding).to(embedding.dtype)], 2)
        positional = self.image_positional_encoding(height, width, embedding).expand(batch_size, -1, -1, -1)
        queries, keys = decoder.transformer(
            point_embeddings=tokens,
            image_embeddings=embedding,
            image_positional_embeddings=positional,
            attention_similarity=None,
        )
        class_tokens_out = queries[:, 0, 2 : 2 + self.num_classes]  # (B, N, C)

        # SAM2's upscaling path, fed with the stride-8 and stride-4 features.
        image = keys[:, 0].transpose(1, 2).reshape(batch_size, channels, height, width)
        upscaled = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(image) + stride8))
        upscaled = decoder.activation(decoder.upscale_conv2(upscaled) + stride4)

        hyper = torch.stack([mlp(class_tokens_out[:, c]) for c, mlp in enumerate(self.class_mlps)], dim=1)
        _, mask_channels, out_h, out_w = upscaled.shape
        masks = hyper @ upscaled.reshape(batch_size, mask_channels, out_h * out_w)
        return masks.reshape(batch_size, self.num_classes, out_h, out_w)
