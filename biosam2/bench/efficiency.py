"""``biosam2 bench efficiency``: parameters, MACs, latency, training-step time and peak memory of
biosam2 and everything it is compared against, measured side by side in one process.

Configurations (all with random weights -- cost does not depend on the values):

==================  ================================================================================
``vanilla-sam2``     SAM2 as users run it today: image resized to 1024 (``--vanilla-size``), SAM2's own
                     positional encoding, frozen, decoder-side training (class heads only)
``biosam2-lw``       PEG + LW adapters, training form (three branches)
``biosam2-lw-fused`` PEG + LW adapters fused into one 3x3 conv each (inference form; no training step)
``biosam2-hp``       PEG + HP (DCNv2) adapters
``peg-only``         PEG, no adapters
``adaptformer``      PEG + AdaptFormer bottleneck adapters (baseline)
``lora``             PEG + LoRA on qkv/proj, unmerged as trained (baseline)
``full-finetune``    PEG + everything trainable (baseline; its inference graph is peg-only's)
``sam-vit-b``        heavyweight reference: transformers ``SamModel(SamConfig())`` (SAM ViT-B), 1024x1024
                     ``pixel_values`` only (prompt-free path: no points, boxes or masks), one mask
                     (``multimask_output=False``); measured once, inference only
==================  ================================================================================

Every biosam2 configuration runs at the input's native size (padded to a multiple of 32), except
vanilla SAM2, which resizes to 1024 whatever the input (its row shows the input and the size it runs at).

For each configuration and input size (``--sizes``):

1. inference, ``model.eval()`` under ``torch.inference_mode()``: one *counted* pass (MACs with
   :mod:`biosam2.bench.flops`, peak memory with :class:`~biosam2.bench.measure.PeakMemory`; it also
   warms caches), ``--warmup`` plain runs, then the timed runs;
2. training, ``model.train()``: Adam (lr 1e-4) over the trainable parameters, its state created
   beforehand so the measured step is a steady-state one; a step = zero_grad, forward,
   cross-entropy against random labels, backward, ``optimizer.step()``; one counted step, then the
   timed steps. Skipped above ``--train-max-size`` (biosam2 trains on 256-px crops; on a 2-core CPU a
   1024-px step costs tens of seconds per configuration), for the fused LW form (inference only) and
   for the reference. (Vanilla SAM2's rows at 256 and 512 do train at 1024: that is what it costs.)
3. once a size's configurations are measured, LW fused, LW unfused, PEG-only and vanilla SAM2 run
   again, back to back in ``--interleaved-rounds`` rounds: the latency targets are judged on the
   per-round ratios, which cancel the drift that separate medians taken minutes apart keep (on this
   2-core VM, two configurations with the same graph differed by up to 25 % in row medians).

On CPU, a timed run that got less than ``--min-cpu-share`` of its cores' time (other processes were
running) is set aside and re-timed, and every row records the load average (see
:mod:`biosam2.bench.measure`) and the dense matmul speed just before it: on a VM the host's other
tenants can slow the machine by tens of percent without any sign in this guest's load or CPU
accounting, and rows begun while it was slow are named in the notes. The machine's dense matmul throughput is measured at the start and
the end of the run, and each configuration's achieved FLOP/s (2 x MACs / median latency) is reported
as a fraction of it.

On CUDA every timing is synchronised and memory comes from the caching allocator's statistics;
``--dtype bf16`` runs everything under ``torch.autocast(bfloat16)``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biosam2.bench.flops import REGISTERED_FORMULAS, MacCount, MacCounter
from biosam2.bench.measure import (
    IdleWaiter,
    InterleavedTiming,
    PeakMemory,
    describe_machine,
    load_average,
    matmul_throughput,
    optimizer_state_tensors,
    tensor_bytes,
    time_interleaved,
    time_runs,
)
from biosam2.bench.report import evaluate_targets, render_markdown
from biosam2.bench.results import (
    CONTENDED_CPU_SHARE,
    HP,
    LW_FUSED,
    LW_TRAINING,
    PEG_ONLY,
    REFERENCE,
    VANILLA,
    BenchmarkResult,
    Row,
)
from biosam2.errors import ConfigError
from biosam2.model.factory import METHODS, build_model, count_parameters
from biosam2.model.sam2_weights import RandomWeightsWarning

SLOW_MACHINE = 0.9  # a row whose pre-row matmul speed is below this fraction of the run's best is flagged
SAM_REFERENCE_SIZE = 1024  # SamConfig's image size: the ViT-B's absolute position table is fixed to it

_DESCRIPTIONS: dict[str, str] = {
    VANILLA: "SAM2 resized to 1024, frozen, decoder-side training",
    LW_TRAINING: "PEG + LW adapters (training form)",
    LW_FUSED: "PEG + LW adapters fused (inference form)",
    HP: "PEG + HP (DCNv2) adapters",
    PEG_ONLY: "PEG without adapters",
    "adaptformer": "PEG + AdaptFormer adapters (baseline)",
    "lora": "PEG + LoRA r8 on qkv/proj, unmerged (baseline)",
    "full-finetune": "PEG + full fine-tuning (baseline)",
}


def _config_descriptions() -> dict[str, str]:
    """Every method of the model factory (so a method added there is benchmarked too), the fused LW
    form after the LW one, and the reference last."""
    configs: dict[str, str] = {}
    for name in [VANILLA, *METHODS]:
        if name in METHODS and name not in configs:
            method = METHODS[name]
            configs[name] = _DESCRIPTIONS.get(name, ", ".join(f"{k}={v}" for k, v in method.items()))
            if name == LW_TRAINING:
                configs[LW_FUSED] = _DESCRIPTIONS[LW_FUSED]
    configs[REFERENCE] = "SAM ViT-B at 1024, prompt-free pixel_values only (reference)"
    return configs


CONFIG_DESCRIPTIONS: dict[str, str] = _config_descriptions()
CONFIGS: tuple[str, ...] = tuple(CONFIG_DESCRIPTIONS)

# Run back to back, round by round, at each size: the latency targets compare them (T1: a few percent apart).
INTERLEAVED = (LW_FUSED, LW_TRAINING, PEG_ONLY, VANILLA)

# Parts of a BioSAM2 model whose MACs are reported separately (regexes on FlopCounterMode's module names).
_COMPONENTS: dict[str, tuple[str, str | None]] = {
    "encoder": (r"BioSAM2\.encoder", None),
    "decoder": (r"BioSAM2\.decoder", None),
    "adapters": (r"BioSAM2\.encoder\..*\.mlp\.adapter", None),
    "lora": (r".*\.lora_[AB]\.[^.]+", None),
    "positional_encoding": (r"BioSAM2\.encoder\.positional_encoding", None),
    # transformers' Sam2MultiScaleAttention computes an eager softmax(q k^T) it never uses (its
    # output comes from sdpa); its matmul is the only bmm inside a Hiera attention module.
    "hiera_unused_attention_weights": (r"BioSAM2\.encoder\..*\.blocks\.\d+\.attn", "aten.bmm"),
    "vision_encoder": (r"SamModel\.vision_encoder", None),
    "mask_decoder": (r"SamModel\.mask_decoder", None),
}


@dataclass
class BenchSettings:
    size: str = "tiny"
    num_classes: int = 2
    sizes: tuple[int, ...] = (512,)
    batch_size: int = 1
    repeats: int = 5
    min_repeats: int = 3
    train_repeats: int = 3
    time_budget_s: float = 8.0
    min_cpu_share: float = CONTENDED_CPU_SHARE  # CPU runs below this share of their cores are re-timed
    contention_wait_s: float = 60.0  # after a contended CPU run, wait up to this long for idle CPUs ...
    contention_wait_total_s: float = 600.0  # ... and at most this long over the whole benchmark
    interleaved_rounds: int = 9  # rounds of LW fused, LW, PEG-only, vanilla back to back, per size; 0: none
    warmup: int = 0
    train_max_size: int = 512
    vanilla_size: int = 1024
    device: str = "auto"
    dtype: str = "fp32"
    configs: tuple[str, ...] = CONFIGS
    matmul_size: int | None = None
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown:
            raise ConfigError(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
        if not self.configs:
            raise ConfigError("--configs: give at least one configuration")
        if not self.sizes or any(s < 32 for s in self.sizes):
            raise ConfigError(f"--sizes {list(self.sizes)}: every input side must be at least 32")
        if self.vanilla_size < 32 or self.vanilla_size % 32:
            raise ConfigError(f"--vanilla-size {self.vanilla_size}: must be a multiple of 32")
        for name in ("batch_size", "repeats", "min_repeats", "train_repeats", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if min(self.warmup, self.time_budget_s, self.interleaved_rounds, self.contention_wait_s) < 0 or (
            self.contention_wait_total_s < 0
        ):
            raise ConfigError("--warmup, --time-budget, --interleaved-rounds and --contention-wait cannot be negative")
        if not 0 <= self.min_cpu_share <= 1:
            raise ConfigError(f"--min-cpu-share {self.min_cpu_share}: must be in [0, 1] (0: keep every run)")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--dtype {self.dtype}: choose fp32 or bf16")
        if self.num_classes < 2:
            raise ConfigError("--num-classes: the training step's cross-entropy needs at least 2 classes")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name}: choose cpu, cuda (cuda:N) or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: choose cpu, cuda (cuda:N) or auto")
    return device


# ---- what is measured ----------------------------------------------------------------------------
@dataclass
class Subject:
    """A built configuration: the module, how to call it, what size it really runs at."""

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor], Any]
    trainable: bool
    fixed_size: int | None = None  # input side forced by the model (the reference)
    compute_size: int | None = None  # side the network runs at whatever the input (vanilla SAM2)


def build_subject(name: str, settings: BenchSettings, device: torch.device) -> Subject:
    """Build one configuration with random weights (seeded) on ``device``."""
    torch.manual_seed(settings.seed)
    if name == REFERENCE:
        from transformers import SamConfig, SamModel

        model = SamModel(SamConfig()).to(device)
        return Subject(
            name,
            model,
            lambda pixels: model(pixel_values=pixels, multimask_output=False).pred_masks,
            trainable=False,
            fixed_size=SAM_REFERENCE_SIZE,
        )
    method = METHODS[LW_TRAINING if name == LW_FUSED else name]
    options: dict[str, Any] = dict(method)
    if name == VANILLA:
        options["input_size"] = settings.vanilla_size
    if name == LW_FUSED:
        options["reparameterized"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(
            settings.size, weights="random", num_classes=settings.num_classes, seed=settings.seed, **options
        )
    model.to(device)
    return Subject(
        name,
        model,
        model,
        trainable=name != LW_FUSED,
        compute_size=settings.vanilla_size if name == VANILLA else None,
    )


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _components(count: MacCount) -> dict[str, int]:
    """MACs per part of the model, and split by kind: ``layers`` (linear, conv, deformable conv: weights
    times activations) and ``activation_products`` (attention and other batched products of two
    activations: sdpa kernels, bmm). Counting tools that hook layers only report the former."""
    found = {name: count.module_macs(pattern, op) for name, (pattern, op) in _COMPONENTS.items()}
    products = sum(macs for op, macs in count.by_operator.items() if "attention" in op or op.endswith("bmm"))
    found["activation_products"] = products
    found["layers"] = count.total - products
    return {name: macs for name, macs in found.items() if macs}


def _materialise_adam_state(optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter]) -> None:
    """Create Adam's moment buffers now (a step with zero gradients: moments stay 0, weights unchanged),
    so that the measured step is a steady-state one, its optimizer state already resident."""
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_subject(
    subject: Subject,
    input_size: int,
    settings: BenchSettings,
    device: torch.device,
    log: Callable[[str], None],
    waiter: IdleWaiter | None = None,
) -> Row:
    """Measure one configuration at one input size (see the module docstring for the protocol)."""
    started = time.perf_counter()
    load_before = load_average()
    # The machine's speed right now (a VM's host can slow it by tens of percent, invisibly to load and
    # CPU share): rows measured while it was slow are named in the notes.
    speed = matmul_throughput(device, _matmul_dtype(settings), _matmul_size(settings, device), runs=3)
    side = subject.fixed_size or input_size
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(settings.batch_size, 3, side, side, generator=generator).to(device)
    model = subject.module
    timing_options = {
        "min_runs": settings.min_repeats,
        "budget_s": settings.time_budget_s,
        "min_cpu_share": settings.min_cpu_share or None,
        "waiter": waiter,
    }

    # Inference.
    model.eval()
    resident = tensor_bytes(itertools.chain(model.parameters(), model.buffers(), [images]))
    with torch.inference_mode(), _autocast(device, settings.dtype):
        with PeakMemory(device, resident) as memory, MacCounter() as counter:
            subject.forward(images)
        for _ in range(settings.warmup):
            subject.forward(images)
        latency = time_runs(lambda: subject.forward(images), device, max_runs=settings.repeats, **timing_options)
    count = counter.result
    assert count is not None
    params = count_parameters(model)
    row = Row(
        config=subject.name,
        input_size=side,
        compute_size=subject.compute_size or side,
        batch_size=settings.batch_size,
        params_total=params.total,
        params_trainable=None if subject.name == REFERENCE else params.trainable,
        macs=count.total,
        latency=latency,
        peak_inference_bytes=memory.peak_bytes,
        components=_components(count),
        macs_by_operator=count.by_operator,
        uncounted_operators=count.uncounted_operators,
        suspicious_uncounted=count.suspicious,
        description=CONFIG_DESCRIPTIONS[subject.name],
        matmul_gflops_before=speed.median_gflops,
    )
    log(f"  inference: {count.total / 1e9:.2f} GMACs, median {latency.median:,.1f} ms over {len(latency.runs_ms)} runs")

    # Training step.
    if not subject.trainable:
        row.train_skipped = "reference" if subject.name == REFERENCE else "inference form"
    elif input_size > settings.train_max_size:
        row.train_skipped = f"> --train-max-size {settings.train_max_size}"
    else:
        _measure_training(subject, row, images, settings, device, timing_options)
        assert row.train_step is not None and row.train_macs is not None
        log(f"  train step: {row.train_macs / 1e9:.2f} GMACs, median {row.train_step.median:,.1f} ms")
    row.wall_s = time.perf_counter() - started
    load_after = load_average()
    if load_before is not None and load_after is not None:
        row.load_average = (load_before, load_after)
    return row


def _measure_training(
    subject: Subject,
    row: Row,
    images: torch.Tensor,
    settings: BenchSettings,
    device: torch.device,
    timing_options: dict[str, Any],
) -> None:
    model = subject.module
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    labels = torch.randint(0, settings.num_classes, (images.shape[0], *images.shape[-2:]), generator=generator)
    labels = labels.to(device)
    _materialise_adam_state(optimizer, parameters)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, settings.dtype):
            logits = subject.forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()

    resident = tensor_bytes(
        itertools.chain(model.parameters(), model.buffers(), optimizer_state_tensors(optimizer), [images, labels])
    )
    try:
        with PeakMemory(device, resident) as memory, MacCounter() as counter:
            step()
        for _ in range(settings.warmup):
            step()
        row.train_step = time_runs(step, device, max_runs=settings.train_repeats, **timing_options | {"min_runs": 1})
    finally:  # drop the gradients; the optimizer and its state go with this frame
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    assert counter.result is not None
    row.train_macs = counter.result.total
    row.train_macs_by_operator = counter.result.by_operator
    row.train_suspicious_uncounted = counter.result.suspicious
    row.peak_train_bytes = memory.peak_bytes


# ---- the run -------------------------------------------------------------------------------------
def run_benchmark(settings: BenchSettings, log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Measure every requested configuration at every requested size; see the module docstring."""
    settings.validate()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, log)
    finally:  # leave the process as it was (the benchmark may run inside a longer-lived one, e.g. tests)
        torch.set_num_threads(threads)


def _run(settings: BenchSettings, log: Callable[[str], None]) -> BenchmarkResult:
    device = resolve_device(settings.device)
    matmul_dtype, matmul_size = _matmul_dtype(settings), _matmul_size(settings, device)
    machine = describe_machine(device)
    where = machine.get("gpu") or machine["cpu"]
    log(f"efficiency benchmark on {device} ({where}), torch threads {machine['torch_threads']}")

    matmul = [matmul_throughput(device, matmul_dtype, matmul_size, min_cpu_share=settings.min_cpu_share or None)]
    log(f"dense {settings.dtype} matmul {matmul_size}^2: {matmul[0].median_gflops:,.1f} GFLOP/s")
    waiter = None
    if device.type == "cpu" and settings.min_cpu_share:
        waiter = IdleWaiter(settings.contention_wait_s, settings.contention_wait_total_s)

    rows: list[Row] = []
    if REFERENCE in settings.configs:  # measured once; freed before the others are built
        log(f"[{REFERENCE}] at {SAM_REFERENCE_SIZE}")
        subject = build_subject(REFERENCE, settings, device)
        rows.append(measure_subject(subject, SAM_REFERENCE_SIZE, settings, device, log, waiter))
        del subject
        _release(device)

    subjects: dict[str, Subject] = {}
    interleaved: dict[int, InterleavedTiming] = {}
    names = [name for name in settings.configs if name != REFERENCE]
    for input_size in settings.sizes:  # sizes outermost: a size's configurations are measured close in time
        for name in names:
            log(f"[{name}] input {input_size}")
            if name not in subjects:
                subjects[name] = build_subject(name, settings, device)
            rows.append(measure_subject(subjects[name], input_size, settings, device, log, waiter))
            _release(device)
        together = [subjects[name] for name in INTERLEAVED if name in subjects]
        if settings.interleaved_rounds and LW_FUSED in subjects and len(together) >= 2:
            rounds = interleaved[input_size] = _interleave(together, input_size, settings, device, waiter)
            medians = {n: statistics.median(r[n] for r in rounds.rounds_ms) for n in rounds.names}
            log(
                f"[interleaved, {len(rounds.rounds_ms)} rounds] input {input_size}: "
                + ", ".join(f"{n} {ms:,.1f} ms" for n, ms in medians.items())
            )
    subjects.clear()
    _release(device)

    matmul.append(matmul_throughput(device, matmul_dtype, matmul_size, min_cpu_share=settings.min_cpu_share or None))
    other = []
    if device.type == "cuda":  # fp32 and bf16 throughput differ by an order of magnitude on GPUs: show both
        other_dtype = torch.float32 if matmul_dtype is torch.bfloat16 else torch.bfloat16
        other.append(matmul_throughput(device, other_dtype, matmul_size))
    settings_json = asdict(settings) | {
        "sizes": list(settings.sizes),
        "configs": list(settings.configs),
        "resolved_device": str(device),
        "matmul_size": matmul_size,
        "contention_waited_s": round(waiter.waited_s, 1) if waiter else 0.0,
    }
    return BenchmarkResult(
        machine=machine, settings=settings_json, matmul=matmul, rows=rows, matmul_other=other, interleaved=interleaved
    )


def _interleave(
    subjects: Sequence[Subject],
    input_size: int,
    settings: BenchSettings,
    device: torch.device,
    waiter: IdleWaiter | None,
) -> InterleavedTiming:
    """Inference of ``subjects`` at ``input_size``, one run each per round (see :class:`InterleavedTiming`)."""
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(settings.batch_size, 3, input_size, input_size, generator=generator).to(device)
    for subject in subjects:
        subject.module.eval()
    with torch.inference_mode(), _autocast(device, settings.dtype):
        return time_interleaved(
            {s.name: (lambda s=s: s.forward(images)) for s in subjects},
            device,
            rounds=settings.interleaved_rounds,
            min_cpu_share=settings.min_cpu_share or None,
            waiter=waiter,
        )


def _matmul_dtype(settings: BenchSettings) -> torch.dtype:
    return torch.bfloat16 if settings.dtype == "bf16" else torch.float32


def _matmul_size(settings: BenchSettings, device: torch.device) -> int:
    return settings.matmul_size or (8192 if device.type == "cuda" else 2048)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_notes(result: BenchmarkResult) -> list[str]:
    """Findings and caveats, written from the measured rows (nothing here is a fixed claim)."""
    notes: list[str] = []
    cores = result.machine.get("cpu_count") or 0
    loads = [load for row in result.rows if row.load_average for load in row.load_average]
    if loads and cores and max(loads) > cores + 0.5:
        busy = [
            f"{row.config}@{row.input_size}"
            for row in result.rows
            if row.load_average and max(row.load_average) > cores + 0.5
        ]
        notes.append(
            f"WARNING: the machine was shared: the 1-minute load average reached {max(loads):.1f} on {cores} cores "
            f"(rows {', '.join(busy)}). Other processes competed for the cores: those latencies are inflated and "
            "scattered, and their ratios are unreliable."
        )
    contended = [
        f"{row.config}@{row.input_size} {kind} ({share:.2f})"
        for row in result.rows
        for kind, share in row.contended_timings()
    ]
    if contended:
        notes.append(
            f"WARNING: some timings got less than {CONTENDED_CPU_SHARE:.0%} of their cores' time (CPU time / "
            f"(wall x threads)) even after re-timing: {', '.join(contended)}. They include waiting for other processes."
        )
    speeds = [m.median_gflops for m in result.matmul] + [
        r.matmul_gflops_before for r in result.rows if r.matmul_gflops_before
    ]
    slow = [
        f"{row.config}@{row.input_size} ({row.matmul_gflops_before / max(speeds) - 1:+.0%})"
        for row in result.rows
        if row.matmul_gflops_before and row.matmul_gflops_before < SLOW_MACHINE * max(speeds)
    ]
    if slow:
        notes.append(
            f"SLOW MACHINE: these rows began while dense matmul ran over {1 - SLOW_MACHINE:.0%} below its best of the "
            f"run ({max(speeds):,.0f} GFLOP/s): {', '.join(slow)}. Their latencies, and ratios to rows measured at "
            "other times, are inflated accordingly."
        )
    start, end = result.matmul[0].median_gflops, result.matmul[-1].median_gflops
    if abs(end / start - 1) > 0.1:
        notes.append(
            f"The machine's own throughput drifted during the run: dense matmul {start:,.0f} GFLOP/s at the start, "
            f"{end:,.0f} at the end ({end / start - 1:+.0%}); other processes (see the load average and CPU shares) "
            "or, on a VM, the host's other tenants. Rows measured at different times carry that drift; the "
            "interleaved rounds that decide the latency targets cancel it."
        )
    if result.settings.get("contention_waited_s"):
        notes.append(
            f"The run waited {result.settings['contention_waited_s']:.0f} s in all for other processes to leave "
            "the CPUs before re-timing contended runs."
        )
    retimed = sum(len(t.contended_ms) for row in result.rows for t in (row.latency, row.train_step) if t is not None)
    if retimed:
        notes.append(
            f"{retimed} timed run(s) got less than {result.settings['min_cpu_share']:.0%} of their cores' time "
            "(other processes were running) and were set aside and re-timed; they are listed in the JSON "
            "(contended_runs_ms)."
        )
    for row in result.rows:
        if row.suspicious_uncounted or row.train_suspicious_uncounted:
            operators = sorted(set(row.suspicious_uncounted) | set(row.train_suspicious_uncounted))
            notes.append(
                f"{row.config} @ {row.input_size}: operators that look like contractions ran without a FLOP "
                f"formula and are NOT counted: {', '.join(operators)}."
            )
    unused = [
        f"{row.components['hiera_unused_attention_weights'] / 1e6:,.1f} MMACs at {row.input_size} "
        f"({100 * row.components['hiera_unused_attention_weights'] / row.macs:.2f}%)"
        for row in result.rows
        if row.config == PEG_ONLY and row.components.get("hiera_unused_attention_weights")
    ]
    if unused:
        notes.append(
            "transformers' Sam2MultiScaleAttention computes eager attention weights softmax(q k^T) that it never "
            "uses (its output comes from sdpa); counted as measured in every SAM2 configuration: "
            + ", ".join(unused)
            + " of peg-only, plus an fp32 softmax over them."
        )
    for config in (LW_TRAINING, LW_FUSED, HP, "adaptformer"):
        shares = [
            f"{row.components['adapters'] / 1e9:.2f} GMACs = {100 * row.components['adapters'] / row.macs:.1f}% "
            f"at {row.input_size}"
            for row in result.rows
            if row.config == config and row.components.get("adapters")
        ]
        if shares:
            notes.append(f"{config}: the adapters are " + "; ".join(shares) + " of the model's MACs.")
    if any(row.config == VANILLA for row in result.rows):
        notes.append(
            f"vanilla-sam2 resizes every input to {result.settings['vanilla_size']} (SAM2's own way), so its cost "
            "hardly depends on the input size; the others run at native size padded to a multiple of 32."
        )
    if any(row.config == "lora" for row in result.rows):
        notes.append(
            "LoRA is measured unmerged (as trained); merged into the weights its inference cost is peg-only's."
        )
    if any(row.config == "full-finetune" for row in result.rows):
        notes.append(
            "full-finetune runs the same inference graph as peg-only (only requires_grad differs): the gap between "
            "their latencies is a measure of run-to-run noise."
        )
    reference = result.reference
    if reference is not None:
        layers = reference.components.get("layers", reference.macs)
        notes.append(
            f"{REFERENCE}: transformers SamModel(SamConfig()) with random weights, pixel_values "
            f"{SAM_REFERENCE_SIZE}x{SAM_REFERENCE_SIZE} only (prompt-free: no points/boxes/masks), "
            "multimask_output=False; its outputs stay at 256x256 (no upsampling), inference only. "
            f"Its {reference.macs / 1e9:.1f} GMACs are {layers / 1e9:.1f} in layers (linear/conv) + "
            f"{(reference.macs - layers) / 1e9:.1f} in attention products; counts that hook layers only "
            "(as G-SAM's 372 GMACs for SAM evidently did) see the first figure. Every MAC figure here "
            "includes attention products, for all configurations alike."
        )
    skipped = sorted({row.input_size for row in result.rows if row.train_skipped and row.train_skipped.startswith(">")})
    if skipped:
        notes.append(
            f"training steps were not measured at {', '.join(map(str, skipped))} (--train-max-size "
            f"{result.settings['train_max_size']}): biosam2 trains on 256-px crops."
        )
    notes.append(
        "FLOP formulas registered for operators torch does not count: "
        + (", ".join(REGISTERED_FORMULAS) if REGISTERED_FORMULAS else "none needed")
        + " (definitions in biosam2/bench/flops.py)."
    )
    return notes


def result_json(result: BenchmarkResult, targets, notes: Sequence[str], command: Sequence[str]) -> dict[str, Any]:
    return {
        "benchmark": "biosam2 bench efficiency",
        "command": list(command),
        "machine": result.machine,
        "settings": result.settings,
        "matmul": {
            "start": result.matmul[0].to_json(),
            "end": result.matmul[-1].to_json(),
            "peak_gflops": result.matmul_peak_gflops,
            "other_dtypes": [m.to_json() for m in result.matmul_other],
        },
        "method": {
            "macs": "torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2, contractions only; extra formulas: "
            + ", ".join(REGISTERED_FORMULAS),
            "memory": "cuda: max_memory_allocated increase + resident tensors"
            if result.machine["device"].startswith("cuda")
            else "cpu: torch.profiler memory events (live tensor bytes) increase + resident tensors; not RSS",
            "latency": "wall time per run, median over timed runs after a counted warm-up pass; CUDA synchronised",
        },
        "rows": [result.row_json(row) for row in result.rows],
        "interleaved": {str(size): timing.to_json() for size, timing in result.interleaved.items()},
        "targets": [t.to_json() for t in targets],
        "notes": list(notes),
    }


# ---- command line --------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``biosam2 bench efficiency`` to ``parser``."""
    defaults = BenchSettings()
    parser.description = parser.description or (
        "Parameters, MACs, latency, training-step time and peak memory of biosam2 and its baselines."
    )
    parser.add_argument(
        "--size", default=defaults.size, help="SAM2 size: tiny, small, base-plus, large (default: %(default)s)"
    )
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes, help="output classes (default: %(default)s)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(defaults.sizes), help="square input sides (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per call (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="at most this many timed inference runs (default: %(default)s)"
    )
    parser.add_argument(
        "--min-repeats",
        type=int,
        default=defaults.min_repeats,
        help="at least this many timed inference runs (default: %(default)s)",
    )
    parser.add_argument(
        "--train-repeats",
        type=int,
        default=defaults.train_repeats,
        help="at most this many timed training steps (default: %(default)s)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=defaults.time_budget_s,
        help="seconds after which a measurement stops repeating once it has its minimum runs (default: %(default)s)",
    )
    parser.add_argument(
        "--min-cpu-share",
        type=float,
        default=defaults.min_cpu_share,
        help="CPU: re-time runs that got less than this share of their cores' time, i.e. runs slowed by other "
        "processes (default: %(default)s; 0 keeps every run)",
    )
    parser.add_argument(
        "--contention-wait",
        type=float,
        default=defaults.contention_wait_s,
        help="CPU: after a run slowed by other processes, wait up to this many seconds for idle CPUs before "
        "re-timing (default: %(default)s)",
    )
    parser.add_argument(
        "--contention-wait-total",
        type=float,
        default=defaults.contention_wait_total_s,
        help="at most this many seconds of such waiting over the whole benchmark (default: %(default)s)",
    )
    parser.add_argument(
        "--interleaved-rounds",
        type=int,
        default=defaults.interleaved_rounds,
        help="per size, rounds of LW fused, LW unfused, PEG-only and vanilla SAM2 run back to back, whose "
        "per-round ratios decide the latency targets (default: %(default)s; 0: none)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="plain warm-up runs after the counted warm-up pass (default: %(default)s)",
    )
    parser.add_argument(
        "--train-max-size",
        type=int,
        default=defaults.train_max_size,
        help="measure training steps only for inputs up to this side (default: %(default)s)",
    )
    parser.add_argument(
        "--vanilla-size", type=int, default=defaults.vanilla_size, help="side vanilla SAM2 resizes to (default: %(default)s)"
    )
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument(
        "--dtype", default=defaults.dtype, choices=["fp32", "bf16"], help="bf16: autocast (default: %(default)s)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS,
        default=list(CONFIGS),
        metavar="CONFIG",
        help="subset of: " + ", ".join(CONFIGS),
    )
    parser.add_argument(
        "--matmul-size", type=int, help="side of the matmul throughput test (default: 2048 CPU, 8192 GPU)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write all raw numbers as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown report here")
    parser.set_defaults(handler=run_from_args)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        size=args.size,
        num_classes=args.num_classes,
        sizes=tuple(args.sizes),
        batch_size=args.batch_size,
        repeats=args.repeats,
        min_repeats=args.min_repeats,
        train_repeats=args.train_repeats,
        time_budget_s=args.time_budget,
        min_cpu_share=args.min_cpu_share,
        contention_wait_s=args.contention_wait,
        contention_wait_total_s=args.contention_wait_total,
        interleaved_rounds=args.interleaved_rounds,
        warmup=args.warmup,
        train_max_size=args.train_max_size,
        vanilla_size=args.vanilla_size,
        device=args.device,
        dtype=args.dtype,
        configs=tuple(dict.fromkeys(args.configs)),
        matmul_size=args.matmul_size,
        threads=args.threads,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed options describe; print the Markdown report, write the files asked for."""
    from biosam2.atomic_io import atomic_write_json, atomic_write_text

    settings = settings_from_args(args)
    started = time.perf_counter()
    result = run_benchmark(settings)
    targets = evaluate_targets(result.rows, result.interleaved)
    notes = build_notes(result)
    result.settings["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = render_markdown(result, targets, notes)
    print(markdown)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result_json(result, targets, notes, sys.argv))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, markdown)
    return 0
