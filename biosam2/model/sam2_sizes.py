"""The four SAM2.1 sizes, as data: architecture, Hugging Face hub id, official checkpoint file.

The architecture numbers are those of Meta's ``sam2.1_hiera_{t,s,b+,l}.yaml`` configurations; the
shapes they imply are checked against the official key lists in ``shared/fixtures`` by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from biosam2.errors import ConfigError

if TYPE_CHECKING:
    from transformers import Sam2Config


@dataclass(frozen=True)
class Sam2Size:
    name: str
    hub_id: str  # transformers-format weights on the Hugging Face hub
    official_file: str  # Meta's checkpoint, also hosted in the hub repository above
    embed_dim: int  # channels of the first Hiera stage; doubled at every stage
    num_heads: int  # attention heads of the first stage; doubled at every stage
    blocks_per_stage: tuple[int, int, int, int]
    global_attention_blocks: tuple[int, ...]
    window_size_per_stage: tuple[int, int, int, int]
    window_background_size: tuple[int, int]  # the interpolated part of Hiera's absolute pos-embed

    @property
    def embed_dim_per_stage(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(4)]

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_per_stage)

    def transformers_config(self) -> Sam2Config:
        """The ``Sam2Config`` of this size (image model only, 1024-px reference resolution)."""
        # imported here: the sizes themselves are read by the command line, which must not load transformers
        from transformers import Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig

        backbone = Sam2HieraDetConfig(
            hidden_size=self.embed_dim,
            num_attention_heads=self.num_heads,
            blocks_per_stage=list(self.blocks_per_stage),
            embed_dim_per_stage=self.embed_dim_per_stage,
            num_attention_heads_per_stage=[self.num_heads * 2**i for i in range(4)],
            window_size_per_stage=list(self.window_size_per_stage),
            global_attention_blocks=list(self.global_attention_blocks),
            window_positional_embedding_background_size=list(self.window_background_size),
        )
        vision = Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=self.embed_dim_per_stage[::-1],
        )
        config = Sam2Config(
            vision_config=vision,
            prompt_encoder_config=Sam2PromptEncoderConfig(),
            mask_decoder_config=Sam2MaskDecoderConfig(),
        )
        config._attn_implementation = "sdpa"
        return config


SAM2_SIZES: dict[str, Sam2Size] = {
    size.name: size
    for size in [
        Sam2Size(
            name="tiny",
            hub_id="facebook/sam2.1-hiera-tiny",
            official_file="sam2.1_hiera_tiny.pt",
            embed_dim=96,
            num_heads=1,
            blocks_per_stage=(1, 2, 7, 2),
            global_attention_blocks=(5, 7, 9),
            window_size_per_stage=(8, 4, 14, 7),
            window_background_size=(7, 7),
        ),
        Sam2Size(
            name="small",
            hub_id="facebook/sam2.1-hiera-small",
            official_file="sam2.1_hiera_small.pt",
            embed_dim=96,
            num_heads=1,
            blocks_per_stage=(1, 2, 11, 2),
            global_attention_blocks=(7, 10, 13),
            window_size_per_stage=(8, 4, 14, 7),
            window_background_size=(7, 7),
        ),
        Sam2Size(
            name="base-plus",
            hub_id="facebook/sam2.1-hiera-base-plus",
            official_file="sam2.1_hiera_base_plus.pt",
            embed_dim=112,
            num_heads=2,
            blocks_per_stage=(2, 3, 16, 3),
            global_attention_blocks=(12, 16, 20),
            window_size_per_stage=(8, 4, 14, 7),
            window_background_size=(14, 14),
        ),
        Sam2Size(
            name="large",
            hub_id="facebook/sam2.1-hiera-large",
            official_file="sam2.1_hiera_large.pt",
            embed_dim=144,
            num_heads=2,
            blocks_per_stage=(2, 6, 36, 4),
            global_attention_blocks=(23, 33, 43),
            window_size_per_stage=(8, 4, 16, 8),
            window_background_size=(7, 7),
        ),
    ]
}


def get_size(name: str) -> Sam2Size:
    key = name.lower().replace("_", "-").replace("base+", "base-plus")
    if key not in SAM2_SIZES:
        raise ConfigError(f"unknown SAM2 size {name!r}: choose one of {', '.join(SAM2_SIZES)}")
    return SAM2_SIZES[key]


def identify_size(embed_dim: int, num_blocks: int) -> str | None:
    """The size whose first-stage width and block count match, or None."""
    for size in SAM2_SIZES.values():
        if size.embed_dim == embed_dim and size.num_blocks == num_blocks:
            return size.name
    return None
