"""The efficiency benchmark's measurements and what is derived from them (ratios, achieved FLOP/s).

Raw numbers live in :class:`Row` (one configuration at one input size); everything derived --
achieved GFLOP/s, its fraction of the measured matmul peak, ratios to vanilla SAM2 at the same input
size and to the SAM ViT-B reference -- is computed by :class:`BenchmarkResult` from those numbers
only, so the Markdown table, the JSON and the targets can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from biosam2.bench.measure import InterleavedTiming, MatmulThroughput, Timing

VANILLA = "vanilla-sam2"
REFERENCE = "sam-vit-b"
LW_TRAINING = "biosam2-lw"
LW_FUSED = "biosam2-lw-fused"
HP = "biosam2-hp"
PEG_ONLY = "peg-only"

# Below this share of its cores' time (see measure.Timing.cpu_share) a CPU timing counts as contended.
# Measured on the 2-core VM: quiet runs 0.93-1.00, HP's deformable convolutions (partly serial) 0.77-0.9
# (training) and 0.9-0.99 (inference); runs sharing the cores with another busy process 0.3-0.5.
CONTENDED_CPU_SHARE = 0.7


@dataclass
class Row:
    """One configuration measured at one input size (batch of ``batch_size`` square images)."""

    config: str
    input_size: int  # side of the images given to the model
    compute_size: int  # side the network actually runs at (vanilla SAM2 resizes; the reference is fixed)
    batch_size: int
    params_total: int
    params_trainable: int | None  # None: not applicable (the reference)
    macs: int  # one inference forward pass, whole batch
    latency: Timing  # inference forward pass, whole batch
    peak_inference_bytes: int
    train_macs: int | None = None  # one training step (forward + backward), whole batch
    train_step: Timing | None = None
    peak_train_bytes: int | None = None
    train_skipped: str | None = None  # why no training step was measured
    components: dict[str, int] = field(default_factory=dict)  # MACs of parts of the model
    macs_by_operator: dict[str, int] = field(default_factory=dict)
    train_macs_by_operator: dict[str, int] = field(default_factory=dict)
    uncounted_operators: dict[str, int] = field(default_factory=dict)
    suspicious_uncounted: list[str] = field(default_factory=list)
    train_suspicious_uncounted: list[str] = field(default_factory=list)
    description: str = ""
    wall_s: float = 0.0  # time spent measuring this row (all passes)
    load_average: tuple[float, float] | None = None  # 1-minute load average before and after the row
    matmul_gflops_before: float | None = None  # dense matmul speed measured just before the row

    @property
    def is_reference(self) -> bool:
        return self.config == REFERENCE

    def contended_timings(self) -> list[tuple[str, float]]:
        """(``"latency"`` or ``"train step"``, CPU share) of this row's timings that other processes slowed."""
        timings = (("latency", self.latency), ("train step", self.train_step))
        return [
            (kind, timing.cpu_share)
            for kind, timing in timings
            if timing is not None and timing.cpu_share is not None and timing.cpu_share < CONTENDED_CPU_SHARE
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "description": self.description,
            "input_size": self.input_size,
            "compute_size": self.compute_size,
            "batch_size": self.batch_size,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "macs": self.macs,
            "gmacs": self.macs / 1e9,
            "mac_components": self.components,
            "macs_by_operator": self.macs_by_operator,
            "train_macs_by_operator": self.train_macs_by_operator,
            "latency": self.latency.to_json(),
            "peak_inference_mb": self.peak_inference_bytes / 2**20,
            "train_macs": self.train_macs,
            "train_step": self.train_step.to_json() if self.train_step else None,
            "peak_train_mb": self.peak_train_bytes / 2**20 if self.peak_train_bytes is not None else None,
            "train_skipped": self.train_skipped,
            "uncounted_operators": self.uncounted_operators,
            "suspicious_uncounted": self.suspicious_uncounted,
            "train_suspicious_uncounted": self.train_suspicious_uncounted,
            "wall_s": self.wall_s,
            "load_average_before_after": list(self.load_average) if self.load_average else None,
            "matmul_gflops_before": self.matmul_gflops_before,
        }


@dataclass
class BenchmarkResult:
    machine: dict[str, Any]
    settings: dict[str, Any]
    matmul: list[MatmulThroughput]  # the run's dtype, measured at the start and at the end of the run
    rows: list[Row]
    matmul_other: list[MatmulThroughput] = field(default_factory=list)  # GPU: the other dtype, for reference
    interleaved: dict[int, InterleavedTiming] = field(default_factory=dict)  # input size -> LW/PEG rounds

    @property
    def matmul_peak_gflops(self) -> float:
        """The higher median of the start/end matmul measurements: fractions of it are conservative."""
        return max(m.median_gflops for m in self.matmul)

    def find(self, config: str, input_size: int | None = None) -> Row | None:
        for row in self.rows:
            if row.config == config and (input_size is None or row.is_reference or row.input_size == input_size):
                return row
        return None

    @property
    def reference(self) -> Row | None:
        return self.find(REFERENCE)

    def achieved_gflops(self, row: Row) -> float:
        return 2.0 * row.macs / (row.latency.median * 1e-3) / 1e9

    def fraction_of_peak(self, row: Row) -> float:
        return self.achieved_gflops(row) / self.matmul_peak_gflops

    def ratios(self, row: Row) -> dict[str, float | None]:
        """``row / vanilla SAM2`` (same input size) and ``row / SAM ViT-B`` for MACs and median latency."""
        vanilla = None if row.is_reference else self.find(VANILLA, row.input_size)
        reference = self.reference
        return {
            "macs_vs_vanilla": row.macs / vanilla.macs if vanilla else None,
            "latency_vs_vanilla": row.latency.median / vanilla.latency.median if vanilla else None,
            "macs_vs_reference": row.macs / reference.macs if reference else None,
            "latency_vs_reference": row.latency.median / reference.latency.median if reference else None,
        }

    def row_json(self, row: Row) -> dict[str, Any]:
        payload = row.to_json()
        payload["achieved_gflops"] = self.achieved_gflops(row)
        payload["fraction_of_matmul_peak"] = self.fraction_of_peak(row)
        if row.train_step is not None and row.train_macs is not None:
            payload["train_achieved_gflops"] = 2.0 * row.train_macs / (row.train_step.median * 1e-3) / 1e9
        payload["ratios"] = self.ratios(row)
        return payload
