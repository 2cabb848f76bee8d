"""``biosam2 bench accuracy``: a grid of methods x datasets x seeds, trained and aggregated reproducibly.

Every cell of a grid runs through the normal training pipeline (:func:`biosam2.training.run.train`: a
cell is exactly ``biosam2 train`` with the cell's options), and the run directories become tables of
mean ± std over seeds. The grid file's schema, the order in which options merge, how paths resolve, the
output folder and the cell states are documented in the README ("Accuracy grids").

- :mod:`.grid`: the grid file, its dataclasses and checks, the shipped grids;
- :mod:`.cells`: cell states, dataset preparation, training one cell, one cell per GPU at a time;
- :mod:`.results`: finished cells read back, mean ± std, results.json and results.md;
- :mod:`.cli`: the options, the run of a whole grid, ``--dry-run``, the ``--run-cell`` worker.
"""

from biosam2.bench.accuracy.cells import (
    CONFLICT, FAILED, FINISHED, NEW, RESUMABLE, CellOutcome, CellState, SubprocessLauncher, cell_state,
    dataset_status, parse_gpus, physical_gpu, prepare_dataset, run_cell, schedule,
)
from biosam2.bench.accuracy.cli import cell_matches, configure_parser, run_from_args
from biosam2.bench.accuracy.grid import Cell, Grid, load_grid, resolve_grid_file, shipped_grids
from biosam2.bench.accuracy.results import aggregate, build_results, collect, render_markdown, summarize, summary
