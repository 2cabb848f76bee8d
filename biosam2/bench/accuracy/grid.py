"""The grid file (schema in the README, "Accuracy grids"): pydantic models of its blocks, the checks
that need the rest of biosam2 (training options, converters, presets), and every error naming the file
and the key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError

from biosam2.errors import ConfigError
from biosam2.options import RANDOM_WEIGHTS

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")]  # it becomes a folder
Names = Annotated[list[str], Field(min_length=1)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConvertSource(_Block):
    """How a dataset is made: ``convert_dataset(name, src, OUT/data/<dataset>, seed=, limit=, **options)``,
    then, with ``folds``, nnU-Net's k-fold splits_final.json in place of the converter's single fold."""

    name: str
    src: Path
    limit: Annotated[StrictInt, Field(ge=1)] | None = None
    seed: StrictInt = 0
    folds: Annotated[StrictInt, Field(ge=2)] | None = None  # nnU-Net's k folds over train+val, as `biosam2 splits`
    options: dict[str, Any] = {}

    def identity(self) -> dict[str, Any]:
        """What makes two conversions the same data: not ``src`` (moving the sources changes nothing),
        but the converters' format version (a changed converter does)."""
        from biosam2.data.convert import CONVERTER_FORMAT_VERSION

        return self.model_dump(exclude={"src"}) | {"format_version": CONVERTER_FORMAT_VERSION}


class DatasetEntry(_Block):
    name: str = ""  # the key in `datasets:`
    label: str | None = None
    convert: ConvertSource | None = None
    path: Path | None = None
    train: dict[str, Any] = {}
    note: str | None = None

    def location(self, out: Path) -> Path:  # where cells read the dataset from
        return out / "data" / self.name if self.convert else self.path


PositiveInt = Annotated[StrictInt, Field(ge=1)]


class NnUNetBlock(_Block):
    """nnU-Net v2 through its own package (biosam2.baselines.nnunet); defaults are nnU-Net's."""

    configuration: str = "2d"  # the fair match for a 2-D slice model
    epochs: PositiveInt = 1000
    iterations_per_epoch: PositiveInt = 250
    val_iterations_per_epoch: PositiveInt = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augmentation_processes: Annotated[StrictInt, Field(ge=0)] | None = None  # nnU-Net's own default


class PredictBlock(_Block):
    """A trained method of the grid predicted another way (same seed): nothing is trained."""

    base: str  # the method whose run predicts
    tta: bool = False
    ensemble: list[str] = []  # other methods whose runs (same dataset and seed) are averaged with it
    # largest connected component: on the classes the run chose on validation, on none, or on every class
    postprocess: Literal["validated", "none", "all"] = "validated"


class PublishedFigure(_Block):
    """A figure a paper published for this method and dataset: what a run of the grid should reproduce."""

    miou: float  # in %, as published
    tolerance: Annotated[float, Field(ge=0)]  # in mIoU points: reproduced when |measured - miou| <= tolerance
    source: str  # citation and the protocol the figure was measured under


class MethodEntry(_Block):
    name: str = ""
    label: str | None = None
    preset: str | None = None  # a key of biosam2.model.factory.METHODS; default: the method's name, if it is one
    train: dict[str, Any] = {}
    nnunet: NnUNetBlock | None = None
    predict: PredictBlock | None = None
    published: dict[str, PublishedFigure] = {}  # dataset -> the figure to reproduce
    datasets: Names | None = None
    note: str | None = None

    @property
    def kind(self) -> str:  # "train" (a biosam2 run), "nnunet" or "predict"
        return "nnunet" if self.nnunet else "predict" if self.predict else "train"


class AblationEntry(_Block):
    title: Annotated[str, Field(min_length=1)]
    methods: Annotated[list[str], Field(min_length=2)]
    datasets: Names | None = None  # default: every dataset all its methods run on
    note: str | None = None


class GridFile(_Block):
    name: Name | None = None
    description: str = ""
    data_root: str = "."
    seeds: Annotated[list[StrictInt], Field(min_length=1)]
    defaults: dict[str, Any] = {}
    datasets: Annotated[dict[Name, DatasetEntry], Field(min_length=1)]
    methods: Annotated[dict[Name, MethodEntry], Field(min_length=1)]
    ablations: list[AblationEntry] = []


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
        entry = self.methods[method]
        if entry.predict:  # where its base and ensemble members run
            return all(self.method_runs_on(m, dataset) for m in [entry.predict.base, *entry.predict.ensemble]) \
                and (entry.datasets is None or dataset in entry.datasets)
        return entry.datasets is None or dataset in entry.datasets

    def cells(self) -> list[Cell]:
        """Every cell, seed first: an interrupted grid has complete tables for its first seeds; in each
        dataset the `predict:` methods come last, after the runs they predict with."""
        methods = sorted(self.methods, key=lambda m: self.methods[m].kind == "predict")
        return [Cell(d, m, s) for s in self.seeds for d in self.datasets for m in methods if self.method_runs_on(m, d)]

    def options(self, dataset: str, method: str, seed: int) -> dict[str, Any]:
        """The cell's TrainConfig options: defaults < dataset's train < method's preset < method's train < seed."""
        from biosam2.model.factory import METHODS

        entry = self.methods[method]
        preset = dict(METHODS[entry.preset]) if entry.preset else {}
        return {**self.defaults, **self.datasets[dataset].train, **preset, **entry.train, "seed": seed}

    def config(self, cell: Cell, runtime: dict[str, Any] | None = None):
        """A training cell's TrainConfig."""
        from biosam2.training.config import TrainConfig

        return TrainConfig.from_dict({**self.options(cell.dataset, cell.method, cell.seed), **(runtime or {})}, cell.key)

    def wanted(self, cell: Cell) -> dict[str, Any]:
        """What the cell's config.yaml must hold for its run to be this cell's."""
        entry = self.methods[cell.method]
        if entry.kind == "train":
            return self.config(cell).to_dict()
        block = entry.nnunet or entry.predict
        return {"method": entry.kind, **block.model_dump(mode="json"), "seed": cell.seed}

    def uses_random_weights(self) -> bool:
        return any(self.config(cell).weights == RANDOM_WEIGHTS for cell in self.cells() if self.methods[cell.method].kind == "train")

    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def shipped_grids() -> dict[str, Path]:
    """The grids that ship with biosam2, by short name (``paper``, ``cpu-smoke``)."""
    return {path.stem: path for path in sorted(GRIDS_DIR.glob("*.yaml"))}


def resolve_grid_file(reference: str | Path) -> Path:
    """A path to a YAML file, or the short name of a shipped grid. An existing file wins over a name."""
    if Path(reference).expanduser().is_file():
        return Path(reference).expanduser().resolve()
    if str(reference) in shipped_grids():
        return shipped_grids()[str(reference)]
    raise ConfigError(f"{reference}: no such grid file, and not the name of a shipped grid ({', '.join(shipped_grids())})")


def _schema_error(file: Path, error: ValidationError) -> ConfigError:
    """The first problem pydantic found, as ``FILE: key.path: what is wrong``."""
    problem = error.errors()[0]
    loc = [str(part) for part in problem["loc"] if part != "[key]"]
    key = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc).lstrip(".")
    message = problem["msg"]
    if problem["type"] == "extra_forbidden":
        key, _, unknown = key.rpartition(".")
        message = f"unknown key(s) {unknown}"
    elif "[key]" in problem["loc"] or problem["type"] == "string_pattern_mismatch":
        message = f"{problem['input']!r} is not a usable name (letters, digits, '.', '_', '+', '-'; it becomes a folder)"
    elif problem["type"] == "missing":
        message = "missing"
    elif not isinstance(problem["input"], (dict, list)):
        message += f" (got {problem['input']!r})"
    return ConfigError(f"{file}: {key}: {message}" if key else f"{file}: {message}")


def load_grid(reference: str | Path, data_root: str | Path | None = None) -> Grid:
    """Read and check a grid file (a path or a shipped grid's name) before anything runs."""
    from biosam2.data.convert import CONVERTERS, check_conversion
    from biosam2.model.factory import METHODS
    from biosam2.training.config import TrainConfig, config_field_names

    file = resolve_grid_file(reference)
    text = file.read_text()
    fail = lambda key, problem: ConfigError(f"{file}: {key}: {problem}")  # noqa: E731

    def known(names: list[str], pool: dict[str, Any], key: str, what: str) -> None:
        if unknown := [n for n in names if n not in pool]:
            raise fail(key, f"unknown {what}(s) {', '.join(unknown)}; the grid has {', '.join(pool)}")
    try:
        raw = GridFile.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML ({error})") from None
    except ValidationError as error:
        raise _schema_error(file, error) from None
    if len(set(raw.seeds)) != len(raw.seeds):
        raise fail("seeds", "a seed is listed twice")

    def checked(options: dict[str, Any], key: str, values: bool = True) -> dict[str, Any]:
        """A block of TrainConfig options: its names, and its values where the block is complete on its own
        (a value can be valid only together with another block's, e.g. adapter_blocks with size)."""
        if "seed" in options:
            raise fail(f"{key}.seed", "the training seed comes from `seeds:` (one cell per seed); remove it here")
        unknown = sorted(set(options) - set(config_field_names()))
        if unknown:
            raise fail(key, f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(config_field_names()))}")
        if values:
            source = f"{file}: {key}"
            try:
                TrainConfig.from_dict(options, source)
            except ConfigError as error:
                raise ConfigError(str(error) if str(error).startswith(source) else f"{source}: {error}") from None
        return options

    # A relative data_root is against the current directory, not the YAML's folder: the shipped grids'
    # ../shared/data means "beside the repository you run from".
    root = Path(data_root if data_root is not None else raw.data_root).expanduser().resolve()
    checked(raw.defaults, "defaults")
    datasets = {}
    for name, entry in raw.datasets.items():
        key, update = f"datasets.{name}", {"name": name, "label": entry.label or name}
        if (entry.convert is None) == (entry.path is None):
            raise fail(key, "give exactly one of `convert:` (a public dataset to convert) or `path:` (a dataset in biosam2's format)")
        if entry.convert:
            try:
                check_conversion(entry.convert.name, entry.convert.options)
            except ConfigError as error:
                raise fail(f"{key}.convert.{'options' if entry.convert.name in CONVERTERS else 'name'}", str(error)) from None
            update["convert"] = entry.convert.model_copy(update={"src": root / entry.convert.src.expanduser()})
        else:
            update["path"] = root / entry.path.expanduser()  # an absolute path stays as it is
        checked(entry.train, f"{key}.train", values=False)
        datasets[name] = entry.model_copy(update=update)
    methods = {}
    for name, entry in raw.methods.items():
        known(list(entry.published), datasets, f"methods.{name}.published", "dataset")
        if entry.kind != "train":
            if entry.nnunet and entry.predict or {"preset", "train"} & entry.model_fields_set:
                raise fail(f"methods.{name}", "give one of `nnunet:`, `predict:` or biosam2's `preset:`/`train:`")
            if entry.predict:
                members = [entry.predict.base, *entry.predict.ensemble]
                known(members, raw.methods, f"methods.{name}.predict", "method")
                if untrained := [m for m in members if raw.methods[m].kind != "train"]:
                    raise fail(f"methods.{name}.predict", f"{', '.join(untrained)}: not a biosam2 method trained by the grid")
            methods[name] = entry.model_copy(update={"name": name, "label": entry.label or name})
            continue
        preset = entry.preset if "preset" in entry.model_fields_set else (name if name in METHODS else None)
        if preset is not None and preset not in METHODS:
            raise fail(f"methods.{name}.preset", f"{preset!r}: choose one of {', '.join(METHODS)}")
        known(entry.datasets or [], datasets, f"methods.{name}.datasets", "dataset")
        checked(entry.train, f"methods.{name}.train", values=False)
        methods[name] = entry.model_copy(update={"name": name, "label": entry.label or name, "preset": preset})
    grid = Grid(raw.name or file.stem, raw.description, file, text, root, "--data-root" if data_root is not None else "grid file",
                tuple(raw.seeds), raw.defaults, datasets, methods, [])
    for dataset in datasets:  # every cell's merged options make a valid TrainConfig before anything runs
        for method in (m for m in methods if grid.method_runs_on(m, dataset) and methods[m].kind == "train"):
            merged = {k: v for k, v in grid.options(dataset, method, 0).items() if k != "seed"}
            try:
                TrainConfig.from_dict(merged)
            except ConfigError:  # name the block that breaks them on its own, if any
                preset = dict(METHODS[methods[method].preset]) if methods[method].preset else {}
                checked({**grid.defaults, **datasets[dataset].train}, f"datasets.{dataset}.train")
                checked({**grid.defaults, **preset, **methods[method].train}, f"methods.{method}.train")
                checked(merged, f"methods.{method} on datasets.{dataset}")
    for index, table in enumerate(raw.ablations):
        key = f"ablations[{index}]"
        known(table.methods, methods, f"{key}.methods", "method")
        common = [d for d in datasets if all(grid.method_runs_on(m, d) for m in table.methods)]
        if [d for d in table.datasets or [] if d not in common]:
            raise fail(f"{key}.datasets", "not every method of the table runs on each of these datasets")
        if not (table.datasets or common):
            raise fail(f"{key}.methods", "these methods share no dataset")
        grid.ablations.append(table.model_copy(update={"datasets": table.datasets or common}))
    return grid
