"""The grid file: its schema, the dataclasses it loads into, and the checks that name the file and key.

The schema itself is documented in the package docstring (:mod:`biosam2.bench.accuracy`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from biosam2.errors import ConfigError
from biosam2.options import RANDOM_WEIGHTS

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

_TOP_KEYS = {"name", "description", "data_root", "seeds", "defaults", "datasets", "methods", "ablations"}
_DATASET_KEYS = {"label", "convert", "path", "train", "note"}
_CONVERT_KEYS = {"name", "src", "limit", "seed", "options"}
_METHOD_KEYS = {"label", "preset", "train", "datasets", "note"}
_ABLATION_KEYS = {"title", "methods", "datasets", "note"}


# ---- the grid -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvertSource:
    """How a dataset is obtained: ``convert_dataset(name, src, OUT/data/<dataset>, seed=, limit=, **options)``."""

    name: str
    src: Path
    limit: int | None
    seed: int
    options: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What makes two conversions the same data; ``src`` is left out so that moving the source
        folder (another ``--data-root``) does not force a reconversion of identical files; the
        converters' format version is in, so that a converter that changed does."""
        from biosam2.data.convert import CONVERTER_FORMAT_VERSION

        return {
            "name": self.name, "limit": self.limit, "seed": self.seed, "options": self.options,
            "format_version": CONVERTER_FORMAT_VERSION,
        }


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    label: str
    convert: ConvertSource | None
    path: Path | None
    train: dict[str, Any]
    note: str | None = None

    def source(self) -> Path:
        """The folder that must exist for this dataset to be usable (the converter's input or the dataset)."""
        return self.convert.src if self.convert else self.path  # type: ignore[return-value]

    def location(self, out: Path) -> Path:
        """Where cells read the dataset from."""
        return out / "data" / self.name if self.convert else self.path  # type: ignore[return-value]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    label: str
    preset: str | None
    train: dict[str, Any]
    datasets: tuple[str, ...] | None
    note: str | None = None


@dataclass(frozen=True)
class AblationEntry:
    title: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    note: str | None = None


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/seed{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.dataset / self.method / f"seed{self.seed}"

    def failure_file(self, out: Path) -> Path:
        return out / "failures" / self.dataset / self.method / f"seed{self.seed}.json"

    def log_file(self, out: Path) -> Path:
        return out / "logs" / self.dataset / self.method / f"seed{self.seed}.log"


@dataclass
class Grid:
    name: str
    description: str
    file: Path
    text: str
    data_root: Path
    data_root_origin: str  # "grid file" or "--data-root"
    seeds: tuple[int, ...]
    defaults: dict[str, Any]
    datasets: dict[str, DatasetEntry]
    methods: dict[str, MethodEntry]
    ablations: list[AblationEntry]

    def method_runs_on(self, method: str, dataset: str) -> bool:
        chosen = self.methods[method].datasets
        return chosen is None or dataset in chosen

    def cells(self) -> list[Cell]:
        """Every cell, seed first: an interrupted grid has complete tables for its first seeds."""
        return [
            Cell(dataset, method, seed)
            for seed in self.seeds
            for dataset in self.datasets
            for method in self.methods
            if self.method_runs_on(method, dataset)
        ]

    def options(self, dataset: str, method: str, seed: int) -> dict[str, Any]:
        """The cell's TrainConfig options, merged in the documented order."""
        from biosam2.model.factory import METHODS

        entry = self.methods[method]
        preset = dict(METHODS[entry.preset]) if entry.preset else {}
        return {**self.defaults, **self.datasets[dataset].train, **preset, **entry.train, "seed": seed}

    def config(self, cell: Cell, runtime: dict[str, Any] | None = None):
        from biosam2.training.config import TrainConfig

        return TrainConfig.from_dict({**self.options(cell.dataset, cell.method, cell.seed), **(runtime or {})}, cell.key)

    def uses_random_weights(self) -> bool:
        return any(self.config(cell).weights == RANDOM_WEIGHTS for cell in self.cells())

    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def shipped_grids() -> dict[str, Path]:
    """The grids that ship with biosam2, by short name (``paper``, ``cpu-smoke``)."""
    return {path.stem: path for path in sorted(GRIDS_DIR.glob("*.yaml"))}


def resolve_grid_file(reference: str | Path) -> Path:
    """A path to a YAML file, or the short name of a shipped grid. An existing file wins over a name."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_grids()
    if str(reference) in shipped:
        return shipped[str(reference)]
    raise ConfigError(
        f"{reference}: no such grid file, and not the name of a shipped grid ({', '.join(shipped) or 'none'})"
    )


# ---- validation ---------------------------------------------------------------------------------
def _fail(file: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


def _mapping(value: Any, file: Path, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(file, key, f"expected a mapping (key: value), got {type(value).__name__}")
    return value


def _check_keys(value: dict[str, Any], allowed: set[str], file: Path, key: str) -> None:
    unknown = sorted(str(k) for k in set(value) - allowed)
    if unknown:
        raise _fail(file, key, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _name(value: Any, file: Path, key: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise _fail(file, key, f"{value!r} is not a usable name (letters, digits, '.', '_', '+', '-'; it becomes a folder)")
    return value


def _optional_text(value: Any, file: Path, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _fail(file, key, f"expected text, got {type(value).__name__}")
    return value


def _name_list(value: Any, known: Iterable[str], file: Path, key: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(file, key, f"expected a non-empty list of {what} names")
    known = list(known)
    unknown = [v for v in value if v not in known]
    if unknown:
        raise _fail(file, key, f"unknown {what}(s) {', '.join(unknown)}; the grid has {', '.join(known)}")
    if len(set(value)) != len(value):
        raise _fail(file, key, f"a {what} is listed twice")
    return tuple(value)


def _train_options(value: Any, file: Path, key: str) -> dict[str, Any]:
    """A block of TrainConfig options; its names are checked here, its values once merged into cells
    (a value can be valid only together with another block's, e.g. adapter_blocks with size)."""
    from biosam2.training.config import config_field_names

    options = _mapping(value, file, key)
    if "seed" in options:
        raise _fail(file, f"{key}.seed", "the training seed comes from `seeds:` (one cell per seed); remove it here")
    unknown = sorted(str(k) for k in set(options) - set(config_field_names()))
    if unknown:
        raise _fail(file, key, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(config_field_names()))}")
    return dict(options)


def _check_cell_options(grid: Grid, dataset: str, method: str) -> None:
    """Validate one cell's merged options; on error name the block that breaks them on its own, if any."""
    from biosam2.model.factory import METHODS
    from biosam2.training.config import TrainConfig

    entry = grid.methods[method]
    try:
        TrainConfig.from_dict(grid.options(dataset, method, grid.seeds[0]))
        return
    except ConfigError:
        pass
    preset = dict(METHODS[entry.preset]) if entry.preset else {}
    for key, options in (
        (f"datasets.{dataset}.train", {**grid.defaults, **grid.datasets[dataset].train}),
        (f"methods.{method}.train", {**grid.defaults, **preset, **entry.train}),
        (f"methods.{method} on datasets.{dataset}", grid.options(dataset, method, grid.seeds[0])),
    ):
        _validated_config(options, grid.file, key, TrainConfig)


def _validated_config(options: dict[str, Any], file: Path, key: str, config_class: Any) -> Any:
    source = f"{file}: {key}"
    try:
        return config_class.from_dict(options, source)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None


def _resolve(path: str, root: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else root / candidate


def load_grid(reference: str | Path, data_root: str | Path | None = None) -> Grid:
    """Read and check a grid file (a path or a shipped grid's name). Every error names the file and key."""
    from biosam2.data.convert import CONVERTERS, check_conversion
    from biosam2.model.factory import METHODS
    from biosam2.training.config import TrainConfig

    file = resolve_grid_file(reference)
    text = file.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML ({error})") from None
    raw = _mapping(raw, file, "")
    _check_keys(raw, _TOP_KEYS, file, "")
    for required in ("seeds", "datasets", "methods"):
        if required not in raw:
            raise _fail(file, required, "missing (required keys: seeds, datasets, methods)")

    name = _name(raw.get("name", file.stem), file, "name")
    description = _optional_text(raw.get("description"), file, "description") or ""
    if data_root is not None:
        root, origin = Path(data_root).expanduser(), "--data-root"
    else:
        given = raw.get("data_root", ".")
        if not isinstance(given, str):
            raise _fail(file, "data_root", "expected a path")
        root, origin = Path(given).expanduser(), "grid file"
    root = root.resolve()  # relative: against the current directory (see the module docstring)

    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(file, "seeds", "expected a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise _fail(file, "seeds", "a seed is listed twice")
    defaults = _train_options(raw.get("defaults"), file, "defaults")
    _validated_config(defaults, file, "defaults", TrainConfig)

    datasets: dict[str, DatasetEntry] = {}
    raw_datasets = _mapping(raw["datasets"], file, "datasets")
    if not raw_datasets:
        raise _fail(file, "datasets", "no datasets")
    for dataset_name, body in raw_datasets.items():
        key = f"datasets.{dataset_name}"
        _name(dataset_name, file, key)
        body = _mapping(body, file, key)
        _check_keys(body, _DATASET_KEYS, file, key)
        if ("convert" in body) == ("path" in body):
            raise _fail(file, key, "give exactly one of `convert:` (a public dataset to convert) or `path:` (a dataset in biosam2's format)")
        convert = path = None
        if "convert" in body:
            block = _mapping(body["convert"], file, f"{key}.convert")
            _check_keys(block, _CONVERT_KEYS, file, f"{key}.convert")
            converter = block.get("name")
            options = _mapping(block.get("options"), file, f"{key}.convert.options")
            try:
                check_conversion(converter, options)
            except ConfigError as error:
                raise _fail(file, f"{key}.convert.{'options' if converter in CONVERTERS else 'name'}", str(error)) from None
            if not isinstance(block.get("src"), str):
                raise _fail(file, f"{key}.convert.src", "missing: the folder of the dataset as distributed")
            limit = block.get("limit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise _fail(file, f"{key}.convert.limit", f"{limit!r}: expected a positive integer or null")
            split_seed = block.get("seed", 0)
            if not isinstance(split_seed, int) or isinstance(split_seed, bool):
                raise _fail(file, f"{key}.convert.seed", f"{split_seed!r}: expected an integer")
            convert = ConvertSource(converter, _resolve(block["src"], root), limit, split_seed, dict(options))
        else:
            if not isinstance(body["path"], str):
                raise _fail(file, f"{key}.path", "expected the path of a dataset in biosam2's format")
            path = _resolve(body["path"], root)
        datasets[dataset_name] = DatasetEntry(
            name=dataset_name,
            label=_optional_text(body.get("label"), file, f"{key}.label") or dataset_name,
            convert=convert,
            path=path,
            train=_train_options(body.get("train"), file, f"{key}.train"),
            note=_optional_text(body.get("note"), file, f"{key}.note"),
        )

    methods: dict[str, MethodEntry] = {}
    raw_methods = _mapping(raw["methods"], file, "methods")
    if not raw_methods:
        raise _fail(file, "methods", "no methods")
    for method_name, body in raw_methods.items():
        key = f"methods.{method_name}"
        _name(method_name, file, key)
        body = _mapping(body, file, key)
        _check_keys(body, _METHOD_KEYS, file, key)
        preset = body.get("preset", method_name if method_name in METHODS else None)
        if preset is not None and preset not in METHODS:
            raise _fail(file, f"{key}.preset", f"{preset!r}: choose one of {', '.join(METHODS)}")
        only = _name_list(body["datasets"], datasets, file, f"{key}.datasets", "dataset") if "datasets" in body else None
        methods[method_name] = MethodEntry(
            name=method_name,
            label=_optional_text(body.get("label"), file, f"{key}.label") or method_name,
            preset=preset,
            train=_train_options(body.get("train"), file, f"{key}.train"),
            datasets=only,
            note=_optional_text(body.get("note"), file, f"{key}.note"),
        )

    grid = Grid(name, description, file, text, root, origin, tuple(seeds), defaults, datasets, methods, [])

    # Every cell's merged options must make a valid TrainConfig before anything runs.
    for dataset_name in datasets:
        for method_name in methods:
            if grid.method_runs_on(method_name, dataset_name):
                _check_cell_options(grid, dataset_name, method_name)

    raw_ablations = raw.get("ablations") or []
    if not isinstance(raw_ablations, list):
        raise _fail(file, "ablations", "expected a list of tables (title, methods, datasets)")
    for index, body in enumerate(raw_ablations):
        key = f"ablations[{index}]"
        body = _mapping(body, file, key)
        _check_keys(body, _ABLATION_KEYS, file, key)
        title = body.get("title")
        if not isinstance(title, str) or not title:
            raise _fail(file, f"{key}.title", "missing: each ablation table needs a title")
        members = _name_list(body.get("methods"), methods, file, f"{key}.methods", "method")
        if len(members) < 2:
            raise _fail(file, f"{key}.methods", "an ablation compares at least two methods")
        common = [d for d in datasets if all(grid.method_runs_on(m, d) for m in members)]
        if "datasets" in body:
            chosen = _name_list(body["datasets"], datasets, file, f"{key}.datasets", "dataset")
            absent = [d for d in chosen if d not in common]
            if absent:
                raise _fail(file, f"{key}.datasets", f"not every method of the table runs on {', '.join(absent)}")
        else:
            chosen = tuple(common)
            if not chosen:
                raise _fail(file, f"{key}.methods", "these methods share no dataset")
        grid.ablations.append(AblationEntry(title, members, chosen, _optional_text(body.get("note"), file, f"{key}.note")))
    return grid
