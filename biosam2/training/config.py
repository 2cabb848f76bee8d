"""Training options: the paper's recipe by default, every value overridable, saved as YAML."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from biosam2.errors import ConfigError
from biosam2.model.config import ModelConfig
from biosam2.options import DEFAULT_WEIGHTS, INPUT_MODES, LOSSES, PRECISIONS, RANDOM_WEIGHTS


@dataclass
class TrainConfig:
    # model (see biosam2.build_model); defaults are ModelConfig's
    size: str = ModelConfig.size
    # "hf" (pretrained SAM2.1, the default), "meta", a hub id, a path, or "random". Runs saved before
    # "random" existed wrote null for random weights: null still means random, so they resume as trained.
    weights: str | None = DEFAULT_WEIGHTS
    adapter: str = ModelConfig.adapter
    pos_encoding: str = ModelConfig.pos_encoding
    adapter_ratio: float = ModelConfig.adapter_ratio
    adapter_scale: float = ModelConfig.adapter_scale
    adapter_blocks: list[int] | None = ModelConfig.adapter_blocks
    lora_rank: int = ModelConfig.lora_rank
    lora_alpha: float = ModelConfig.lora_alpha
    # resize every image to this square (model and training data alike); crops are then cut from the
    # resized image (G-SAM's ISBI recipe: input_size 256, input_mode crop, patch_size 128)
    input_size: int | None = ModelConfig.input_size
    # optimisation: Adam, lr 1e-4, cosine to 0, 200 epochs, batch 8, cross-entropy (the paper's/G-SAM's)
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    loss: str = "ce"
    # data
    fold: int = 0
    patch_size: int = 256
    input_mode: str = "crop"  # "crop": random patch_size crops; "resize": whole image resized to patch_size
    augment: bool = True
    # share of training crops centred on a foreground pixel (nnU-Net oversamples 0.33); 0: uniform random crops
    foreground_share: float = 0.0
    limit_train_batches: int | None = None  # cap on steps per epoch (quick runs)
    # run
    seed: int = 0
    precision: str = "auto"  # "auto": bf16/16 mixed on GPU, 32 on CPU
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    num_workers: int = 2
    val_every: int = 1  # epochs between validations
    gradient_checkpointing: bool = False
    overlays: int = 4  # prediction overlays written to the run directory
    evaluate_test: bool = True  # predict and evaluate the test split at the end

    def __post_init__(self) -> None:
        self._check_types()
        if self.weights is None:
            self.weights = RANDOM_WEIGHTS
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.input_mode not in INPUT_MODES:
            raise ConfigError(f"input_mode={self.input_mode!r}: choose one of {', '.join(INPUT_MODES)}")
        for name in ("epochs", "batch_size", "patch_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be at least 1")
        if not 0.0 <= self.foreground_share <= 1.0:
            raise ConfigError(f"foreground_share={self.foreground_share}: must be between 0 and 1")
        if self.foreground_share and self.input_mode != "crop":
            raise ConfigError("foreground_share needs input_mode crop (resized whole images have nothing to centre)")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: must be positive")
        self.model_config(num_classes=2)  # validates the model options early, with their names

    def _check_types(self) -> None:
        """Numbers, flags and names of the right kind, each error naming its option (YAML is untyped)."""
        for item in fields(self):
            value, kind = getattr(self, item.name), str(item.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("bool"):
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind.startswith("str"):
                ok = isinstance(value, str)
            elif kind.startswith("list[int]"):
                ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            else:  # "Any" (devices): Lightning validates it
                ok = True
            if not ok:
                raise ConfigError(f"{item.name}={value!r}: expected {kind.replace(' | None', ' or null')}")

    def model_options(self) -> dict[str, Any]:
        names = {f.name for f in fields(ModelConfig)} - {"num_classes", "reparameterized", "extra"}
        return {name: getattr(self, name) for name in names}

    def model_config(self, num_classes: int) -> ModelConfig:
        return ModelConfig(num_classes=num_classes, **self.model_options())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**payload)
        except TypeError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        try:
            payload = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(payload, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        return cls.from_dict({**payload, **(overrides or {})}, str(path))

def config_field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
