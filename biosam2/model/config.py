"""The JSON-serialisable description of a biosam2 model: everything ``build_model`` needs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from biosam2.errors import ConfigError
from biosam2.model.sam2_sizes import get_size
from biosam2.options import ADAPTERS, POSITIONAL_ENCODINGS


@dataclass
class ModelConfig:
    size: str = "tiny"
    num_classes: int = 2
    adapter: str = "hp"
    pos_encoding: str = "peg"
    adapter_ratio: float = 0.25  # bottleneck width as a fraction of the block's width
    adapter_scale: float = 0.5  # weight of the adapter branch next to the frozen MLP
    adapter_blocks: list[int] | None = None  # Hiera block indices that get adapters; None = all
    lora_rank: int = 8
    lora_alpha: float = 8.0
    input_size: int | None = None  # None: native resolution; N: resize to N x N (SAM2's own way)
    reparameterized: bool = False  # LW adapters fused into single convolutions
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. what a training run adds

    def __post_init__(self) -> None:
        self.size = get_size(self.size).name
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"adapter={self.adapter!r}: choose one of {', '.join(ADAPTERS)}")
        if self.pos_encoding not in POSITIONAL_ENCODINGS:
            raise ConfigError(f"pos_encoding={self.pos_encoding!r}: choose one of {', '.join(POSITIONAL_ENCODINGS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"num_classes={self.num_classes!r}: must be a positive integer (background included)")
        if not 0 < self.adapter_ratio <= 4:
            raise ConfigError(f"adapter_ratio={self.adapter_ratio}: must be in (0, 4]")
        num_blocks = get_size(self.size).num_blocks
        if self.adapter_blocks is not None:
            self.adapter_blocks = sorted({int(b) for b in self.adapter_blocks})
            outside = [b for b in self.adapter_blocks if not 0 <= b < num_blocks]
            if outside or not self.adapter_blocks:
                raise ConfigError(
                    f"adapter_blocks={self.adapter_blocks}: SAM2 {self.size} has blocks 0..{num_blocks - 1}"
                )
        if self.input_size is not None and (self.input_size < 32 or self.input_size % 32):
            raise ConfigError(f"input_size={self.input_size}: must be a multiple of 32, at least 32")
        if self.reparameterized and self.adapter != "lw":
            raise ConfigError("reparameterized=True only applies to adapter='lw'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ConfigError(f"unknown model options: {', '.join(unknown)}")
        return cls(**payload)
