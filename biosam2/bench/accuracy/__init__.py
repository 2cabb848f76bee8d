"""``biosam2 bench accuracy``: a grid of methods x datasets x seeds, trained and aggregated reproducibly.

The paper reports one number per method and dataset and no run-to-run spread; reviewers asked for
spread and ablations. This harness runs every cell of a grid through the normal training pipeline
(:func:`biosam2.training.run.train`, so a cell is exactly ``biosam2 train`` with the cell's options)
and turns the run directories into tables of mean ± std over seeds.

Grid file (YAML)::

    name: cpu-smoke                  # optional; default: the file name
    description: what the grid shows
    data_root: ../shared/data        # where relative dataset paths point (see "Paths" below)
    seeds: [0, 1]                    # one cell per seed; `seed` may not be set anywhere else
    defaults:                        # TrainConfig options shared by every cell
      weights: random                # the default is hf: pretrained SAM2.1
      epochs: 4
    datasets:
      isbi2012:                      # a name: [A-Za-z0-9][A-Za-z0-9._+-]*, used in paths
        label: ISBI 2012             # optional, the column title
        convert: {name: isbi2012, src: isbi2012, limit: null, seed: 0, options: {}}
        train: {patch_size: 128}     # TrainConfig options for this dataset's cells
        note: free text              # optional
      mydata:
        path: /data/mydata           # or an existing biosam2-format dataset
    methods:
      biosam2-hp:                    # preset defaults to the name when it is a key of METHODS
        label: BioSAM2 HP
        preset: biosam2-hp           # a key of biosam2.model.factory.METHODS (optional)
        train: {adapter_ratio: 0.5}  # TrainConfig options for this method's cells
        datasets: [isbi2012]         # optional: run it on these datasets only (ablation-only methods)
        note: free text
    ablations:                       # optional: which methods form which ablation table
      - title: Positional encoding
        methods: [biosam2-hp, hp-sam2-pe]
        datasets: [isbi2012]         # optional; default: every dataset all its methods run on
        note: free text

A cell's options are, later entries winning: TrainConfig's defaults < ``defaults`` < the dataset's
``train`` < the method's preset < the method's ``train`` < the cell's seed. Every block is checked
against TrainConfig when the grid is loaded, so a typo fails before anything trains, with the file
and the key named.

Paths: a relative ``convert.src`` or ``path`` is resolved against ``data_root``; a relative
``data_root`` is resolved against the **current directory** (not the YAML's folder: the shipped grids
live inside the installed package, and their ``../shared/data`` means "beside the repository you run
from"). ``--data-root`` replaces ``data_root``. A ``convert`` dataset is converted once, with the
given split seed (the split does not change with the training seed), into ``OUT/data/<dataset>``;
``OUT/data/<dataset>.convert.json`` records how, and the copy is reused by every later invocation.

Output folder::

    OUT/runs/<dataset>/<method>/seed<k>/   one ordinary run directory per cell (see biosam2.training.run)
    OUT/data/<dataset>/                    converted datasets
    OUT/failures/<dataset>/<method>/seed<k>.json   why a cell's last attempt failed (removed on success)
    OUT/logs/<dataset>/<method>/seed<k>.log        worker output (--gpus only)
    OUT/grid.yaml                          the grid file as last run
    OUT/invocations.jsonl                  one line per invocation: command, times, load, outcome
    OUT/results.json, OUT/results.md       the tables

A cell is *finished* when its run directory holds ``metrics.json`` (skipped), *resumable* when it holds
``checkpoints/last.ckpt`` only (continued with ``train(..., resume=True)``), *new* when the directory is
absent or empty, and a *conflict* otherwise, or when the run's ``config.yaml`` differs from what the
grid now asks for (never overwritten: the message says what to move away). A failed cell is
reported and recorded, the grid goes on, and the exit status is 1 at the end.

``--gpus 0,1`` runs cells in parallel, one worker per listed GPU (``0,0,1,1``: two per GPU). Each cell
runs in a fresh ``python -m biosam2.bench.accuracy ... --run-cell`` process whose
``CUDA_VISIBLE_DEVICES`` names its GPU before torch starts, so a cell can only see its own device and a
crash (out of memory, a segfault) ends that cell only. Without ``--gpus`` cells run one after another
in this process, on whatever device the cell's options choose.

The package, by step of the workflow:

- :mod:`.grid`: the grid file's schema, its dataclasses and checks, the shipped grids;
- :mod:`.cells`: cell states, dataset preparation, training one cell, scheduling cells on GPUs;
- :mod:`.results`: finished cells read back, mean ± std, results.json and results.md, invocation history;
- :mod:`.cli`: the options, the run of a whole grid, ``--dry-run``, the ``--run-cell`` worker.
"""

from biosam2.bench.accuracy.cells import (
    CONFLICT,
    FAILED,
    FINISHED,
    NEW,
    NO_DATA,
    RESUMABLE,
    CellOutcome,
    CellState,
    SubprocessLauncher,
    cell_state,
    dataset_status,
    parse_gpus,
    physical_gpu,
    prepare_dataset,
    run_cell,
    schedule,
)
from biosam2.bench.accuracy.cli import cell_matches, configure_parser, run_from_args
from biosam2.bench.accuracy.grid import Cell, Grid, load_grid, resolve_grid_file, shipped_grids
from biosam2.bench.accuracy.results import (
    CellRecord,
    Summary,
    aggregate,
    build_results,
    collect,
    render_markdown,
    summarize,
)

__all__ = [
    "CONFLICT",
    "FAILED",
    "FINISHED",
    "NEW",
    "NO_DATA",
    "RESUMABLE",
    "Cell",
    "CellOutcome",
    "CellRecord",
    "CellState",
    "Grid",
    "SubprocessLauncher",
    "Summary",
    "aggregate",
    "build_results",
    "cell_matches",
    "cell_state",
    "collect",
    "configure_parser",
    "dataset_status",
    "load_grid",
    "parse_gpus",
    "physical_gpu",
    "prepare_dataset",
    "render_markdown",
    "resolve_grid_file",
    "run_cell",
    "run_from_args",
    "schedule",
    "shipped_grids",
    "summarize",
]
