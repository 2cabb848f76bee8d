"""``biosam2 bench efficiency``: parameters, MACs, latency, training-step time and peak memory of
biosam2 and what it is compared against, side by side in one process, with random weights (cost does
not depend on the values): every method of :data:`biosam2.model.factory.METHODS`, ``biosam2-lw-fused``
(the inference form), and ``sam-vit-b`` (transformers' ``SamModel(SamConfig())`` at 1024, prompt-free:
the heavyweight reference). biosam2 runs at the input's native size; ``vanilla-sam2`` resizes to 1024.

For each configuration and input size:

1. inference (``eval()``, ``inference_mode``): one counted pass (MACs through
   ``torch.utils.flop_counter`` with the formulas of :mod:`.flops`; peak memory), then
   ``torch.utils.benchmark.Timer.blocked_autorange`` for ``--min-run-time`` seconds;
2. a training step (Adam over the trainable parameters, its state created beforehand; zero_grad,
   forward, cross-entropy on random labels, backward, step): counted, then timed the same way.
   Skipped above ``--train-max-size``, for the fused form and for the reference;
3. once a size's configurations are measured, those of :data:`INTERLEAVED` run again in
   ``--interleaved-rounds`` plain rounds, one call each, the order rotating: comparing two
   configurations round by round cancels the drift of a shared machine that separate medians keep.

Peak memory is the tensors resident before the call (weights, buffers, optimizer state, inputs) plus
the largest increase of live tensor bytes during it: on CUDA from the caching allocator's peak, on CPU
from ``torch.profiler``'s memory events (torch's allocator only: not RSS).

The report judges nothing: ``benchmarks/efficiency_targets.py`` checks the targets from ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import timer

from biosam2.bench import describe_machine
from biosam2.bench.flops import REGISTERED_FORMULAS, MacCount, MacCounter
from biosam2.errors import ConfigError
from biosam2.inference.predict_files import check_device
from biosam2.model.factory import METHODS, build_model, count_parameters
from biosam2.model.sam2_weights import RandomWeightsWarning

# kineto (behind torch.profiler, the CPU peak memory) logs a harmless "gpuGetDeviceCount failed" ERROR
# on machines without a GPU; read at the profiler's first use.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

VANILLA, REFERENCE, LW_FUSED, PEG_ONLY = "vanilla-sam2", "sam-vit-b", "biosam2-lw-fused", "peg-only"
CONFIGS: tuple[str, ...] = (*METHODS, LW_FUSED, REFERENCE)
INTERLEAVED = (LW_FUSED, "biosam2-lw", PEG_ONLY, VANILLA)  # what the latency targets compare, round by round
SAM_REFERENCE_SIZE = 1024  # SamConfig's image size: ViT-B's absolute position table is fixed to it


@dataclass
class BenchSettings:
    size: str = "tiny"
    num_classes: int = 2
    sizes: tuple[int, ...] = (512,)
    batch_size: int = 1
    min_run_time: float = 3.0  # seconds of timed runs per measurement (blocked_autorange); at least one run
    interleaved_rounds: int = 9
    train_max_size: int = 512
    vanilla_size: int = 1024
    device: str = "auto"
    dtype: str = "fp32"
    configs: tuple[str, ...] = CONFIGS
    seed: int = 0

    def validate(self) -> None:
        if not self.sizes or min(self.sizes) < 32:
            raise ConfigError(f"--sizes {list(self.sizes)}: every input side must be at least 32")
        if self.vanilla_size < 32 or self.vanilla_size % 32:
            raise ConfigError(f"--vanilla-size {self.vanilla_size}: must be a multiple of 32")
        if min(self.batch_size, self.num_classes - 1) < 1:
            raise ConfigError("--batch-size must be at least 1 and --num-classes at least 2")
        if min(self.min_run_time, self.interleaved_rounds) < 0:
            raise ConfigError("--min-run-time and --interleaved-rounds cannot be negative")


# ---- measuring ----------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], min_run_time: float) -> dict[str, Any]:
    """Wall times of ``fn()`` from torch.utils.benchmark (it synchronises accelerators), in ms."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": 1e3 * measured.median, "iqr_ms": 1e3 * measured.iqr, "runs_ms": [1e3 * t for t in measured.times]}


class PeakMemory:
    """``with PeakMemory(device, resident_bytes) as m: ...``; then ``m.peak_bytes`` (see the module docstring)."""

    def __init__(self, device: torch.device, resident_bytes: int):
        self.device, self.resident_bytes, self.peak_bytes = device, resident_bytes, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            increase = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._profiler.__exit__(*exc)
            increase = peak_running_sum([(e.start_ns(), e.nbytes()) for e in self._profiler.profiler.kineto_results.events()
                                         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU])
        self.peak_bytes = self.resident_bytes + max(0, increase)


def peak_running_sum(events: list[tuple[int, int]]) -> int:
    """Largest running sum (at least 0) of signed byte counts replayed in time order."""
    return max([0, *itertools.accumulate(nbytes for _, nbytes in sorted(events, key=lambda e: e[0]))])


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once)."""
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@dataclass
class Subject:
    """A built configuration: the module, how to call it, and the side it really runs at."""

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor], Any]
    trainable: bool
    fixed_size: int | None = None  # input side forced by the model (the reference)
    compute_size: int | None = None  # side the network runs at whatever the input (vanilla SAM2)


def build_subject(name: str, settings: BenchSettings, device: torch.device) -> Subject:
    torch.manual_seed(settings.seed)
    if name == REFERENCE:
        from transformers import SamConfig, SamModel

        model = SamModel(SamConfig()).to(device)
        forward = lambda pixels: model(pixel_values=pixels, multimask_output=False).pred_masks  # noqa: E731
        return Subject(name, model, forward, trainable=False, fixed_size=SAM_REFERENCE_SIZE)
    options: dict[str, Any] = dict(METHODS["biosam2-lw" if name == LW_FUSED else name])
    if name == VANILLA:
        options["input_size"] = settings.vanilla_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(settings.size, weights="random", num_classes=settings.num_classes, seed=settings.seed,
                            reparameterized=name == LW_FUSED, **options)
    compute = settings.vanilla_size if name == VANILLA else None
    return Subject(name, model.to(device), model, trainable=name != LW_FUSED, compute_size=compute)


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def _components(count: MacCount) -> dict[str, int]:
    """MACs by kind: ``layers`` (linear, conv, deformable conv) and ``activation_products`` (attention, bmm;
    in Hiera also the eager softmax(q k^T) transformers computes and never uses). Counters that hook layers
    only, as the 372 GMACs quoted for SAM, see the former."""
    products = sum(m for op, m in count.by_operator.items() if "attention" in op or op.endswith("bmm"))
    return {"layers": count.total - products, "activation_products": products}


def measure(subject: Subject, input_size: int, settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """One configuration at one input size: the row of the table (see the module docstring)."""
    side = subject.fixed_size or input_size
    generator = torch.Generator().manual_seed(settings.seed)
    images = torch.rand(settings.batch_size, 3, side, side, generator=generator).to(device)
    model = subject.module.eval()
    resident = tensor_bytes(itertools.chain(model.parameters(), model.buffers(), [images]))
    with torch.inference_mode(), _autocast(device, settings.dtype):
        with PeakMemory(device, resident) as memory, MacCounter() as counter:
            subject.forward(images)
        latency = _timed(lambda: subject.forward(images), settings.min_run_time)
    count = counter.result
    params = count_parameters(model)
    row: dict[str, Any] = {
        "config": subject.name, "input_size": side, "compute_size": subject.compute_size or side,
        "batch_size": settings.batch_size, "params_total": params.total,
        "params_trainable": None if subject.name == REFERENCE else params.trainable,
        "macs": count.total, "mac_components": _components(count), "macs_by_operator": count.by_operator,
        "suspicious_uncounted": count.suspicious, "latency": latency, "peak_inference_mb": memory.peak_bytes / 2**20,
        "train_step": None, "train_skipped": None,
    }
    if not subject.trainable:
        row["train_skipped"] = "reference" if subject.name == REFERENCE else "inference form"
    elif input_size > settings.train_max_size:
        row["train_skipped"] = f"> --train-max-size {settings.train_max_size}"
    else:
        row.update(_measure_training(subject, images, settings, device))
    return row


def _measure_training(subject: Subject, images: torch.Tensor, settings: BenchSettings, device: torch.device) -> dict:
    model = subject.module.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    labels = torch.randint(0, settings.num_classes, (images.shape[0], *images.shape[-2:]), generator=generator).to(device)
    for parameter in parameters:  # create Adam's state now (zero moments, weights unchanged): a steady-state step
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, settings.dtype):
            logits = subject.forward(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    resident = tensor_bytes(itertools.chain(model.parameters(), model.buffers(), state, [images, labels]))
    try:
        with PeakMemory(device, resident) as memory, MacCounter() as counter:
            step()
        timing = _timed(step, settings.min_run_time)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return {"train_step": timing, "train_macs": counter.result.total, "peak_train_mb": memory.peak_bytes / 2**20,
            "train_suspicious_uncounted": counter.result.suspicious}


def interleave(subjects: list[Subject], input_size: int, settings: BenchSettings, device: torch.device) -> list[dict]:
    """``rounds[i][name]``: ms of one inference call of ``name`` in round i (the order rotates)."""
    images = torch.rand(settings.batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    rounds = []
    with torch.inference_mode(), _autocast(device, settings.dtype):
        for index in range(settings.interleaved_rounds):
            shift = index % len(subjects)
            times = {}
            for subject in subjects[shift:] + subjects[:shift]:
                started = timer()  # torch.utils.benchmark's clock: it synchronises accelerators
                subject.forward(images)
                times[subject.name] = 1e3 * (timer() - started)
            rounds.append({s.name: times[s.name] for s in subjects})
    return rounds


# ---- the run ------------------------------------------------------------------------------------
def run_benchmark(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every requested configuration at every requested size; returns the JSON document."""
    settings.validate()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if settings.device == "auto" else check_device(settings.device))
    machine = describe_machine() | {"device": str(device)}
    log(f"efficiency benchmark on {device}, {machine['torch_threads']} threads")
    rows: list[dict[str, Any]] = []
    if REFERENCE in settings.configs:  # measured once, and freed before the others are built
        log(f"[{REFERENCE}] at {SAM_REFERENCE_SIZE}")
        rows.append(measure(build_subject(REFERENCE, settings, device), SAM_REFERENCE_SIZE, settings, device))
        _release(device)
    subjects: dict[str, Subject] = {}
    interleaved: dict[str, list[dict]] = {}
    for input_size in settings.sizes:  # sizes outermost: a size's rows are measured close in time
        for name in (n for n in settings.configs if n != REFERENCE):
            if name not in subjects:
                subjects[name] = build_subject(name, settings, device)
            row = measure(subjects[name], input_size, settings, device)
            log(f"[{name}] {input_size}: {row['macs'] / 1e9:.2f} GMACs, {row['latency']['median_ms']:,.1f} ms")
            rows.append(row)
            _release(device)
        together = [subjects[n] for n in INTERLEAVED if n in subjects]
        if settings.interleaved_rounds and len(together) >= 2:
            interleaved[str(input_size)] = interleave(together, input_size, settings, device)
    return {
        "benchmark": "biosam2 bench efficiency",
        "machine": machine,
        "settings": asdict(settings) | {"resolved_device": str(device)},
        "method": {"macs": "torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2, contractions only; formulas "
                   "added: " + (", ".join(REGISTERED_FORMULAS) or "none"),
                   "latency": "torch.utils.benchmark.Timer.blocked_autorange after a counted warm-up pass",
                   "memory": "resident tensors + peak increase (cuda: max_memory_allocated; cpu: torch.profiler memory events, not RSS)"},
        "rows": [row | {"achieved_gflops": 2 * row["macs"] / row["latency"]["median_ms"] / 1e6} for row in rows],
        "interleaved": interleaved,
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the report ---------------------------------------------------------------------------------
def _ms(timing: dict | None) -> str:
    return "-" if timing is None else f"{timing['median_ms']:,.1f} ± {timing['iqr_ms'] / 2:,.1f} (n={len(timing['runs_ms'])})"


def render_markdown(result: dict[str, Any]) -> str:
    machine, settings = result["machine"], result["settings"]
    lines = [
        "# biosam2 efficiency benchmark",
        "",
        f"- Date (UTC): {machine['date_utc']}; device: {machine['device']} ({', '.join(machine['gpus']) or 'no GPU'}); "
        f"CPU {machine['cpu']}, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads",
        f"- Software: torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']} "
        f"({machine['platform']})",
        f"- Settings: SAM2 {settings['size']}, {settings['num_classes']} classes, batch {settings['batch_size']}, "
        f"{settings['dtype']}, random weights",
        f"- Latency: {result['method']['latency']} ({settings['min_run_time']:g} s per row; training steps for inputs "
        f"up to {settings['train_max_size']} px); median ± half the IQR",
        f"- MACs: {result['method']['macs']}",
        f"- Peak memory (MB): {result['method']['memory']}",
        "",
        "| configuration | input (runs at) | params | trainable | GMACs | latency ms | train step ms | "
        "peak MB infer / train | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["config"] == REFERENCE, r["input_size"])):
        size = str(row["input_size"]) + ("" if row["compute_size"] == row["input_size"] else f" ({row['compute_size']})")
        trainable = row["params_trainable"]
        trainable = "n/a" if trainable is None else f"{trainable / 1e6:.2f} M ({100 * trainable / row['params_total']:.1f}%)"
        train = _ms(row["train_step"]) if row["train_step"] else f"- ({row['train_skipped']})"
        peak_train = f"{row['peak_train_mb']:,.0f}" if row.get("peak_train_mb") else "-"
        lines.append(
            f"| {row['config']} | {size} | {row['params_total'] / 1e6:.2f} M | {trainable} | {row['macs'] / 1e9:,.2f} | "
            f"{_ms(row['latency'])} | {train} | {row['peak_inference_mb']:,.0f} / {peak_train} | {row['achieved_gflops']:,.1f} |")
    for size, rounds in result["interleaved"].items():
        names = list(rounds[0])
        lines += ["", f"Interleaved rounds at {size} ({len(rounds)} rounds, one call each, order rotating): "
                  "median ms, and the median of the per-round ratios to the first column", ""]
        lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        lines.append("| " + " | ".join(
            f"{statistics.median(r[n] for r in rounds):,.1f} ({statistics.median(r[n] / r[names[0]] for r in rounds):.3f}x)"
            for n in names) + " |")
    for row in result["rows"]:
        missed = sorted(set(row["suspicious_uncounted"]) | set(row.get("train_suspicious_uncounted") or []))
        if missed:
            lines += ["", f"- {row['config']} @ {row['input_size']}: contraction-like operators without a FLOP formula, "
                      f"NOT counted: {', '.join(missed)}"]
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``biosam2 bench efficiency`` to ``parser``."""
    defaults = BenchSettings()
    add = parser.add_argument
    add("--size", default=defaults.size, help="SAM2 size: tiny, small, base-plus, large (default: %(default)s)")
    add("--num-classes", type=int, default=defaults.num_classes, help="output classes (default: %(default)s)")
    add("--sizes", type=int, nargs="+", default=list(defaults.sizes), help="square input sides (default: %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size, help="images per call (default: %(default)s)")
    add("--min-run-time", type=float, default=defaults.min_run_time, help="seconds of timed inference, and of "
        "training steps, per row: torch.utils.benchmark's blocked_autorange (default: %(default)s)")
    add("--interleaved-rounds", type=int, default=defaults.interleaved_rounds,
        help=f"per size, rounds of {', '.join(INTERLEAVED)} run back to back (default: %(default)s; 0: none)")
    add("--train-max-size", type=int, default=defaults.train_max_size,
        help="measure training steps only for inputs up to this side (default: %(default)s)")
    add("--vanilla-size", type=int, default=defaults.vanilla_size, help="side vanilla SAM2 resizes to (default: %(default)s)")
    add("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    add("--dtype", default=defaults.dtype, choices=["fp32", "bf16"], help="bf16: autocast (default: %(default)s)")
    add("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), metavar="CONFIG", help="subset of: " + ", ".join(CONFIGS))
    add("--json", type=Path, help="write all raw numbers as JSON here")
    add("--markdown", type=Path, help="also write the Markdown report here")
    parser.set_defaults(handler=run_from_args)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark; print the Markdown report; write the files asked for."""
    from biosam2.atomic_io import atomic_write_json, atomic_write_text

    names = {k: v for k, v in vars(args).items() if k in BenchSettings.__dataclass_fields__}
    settings = BenchSettings(**names | {"sizes": tuple(args.sizes), "configs": tuple(dict.fromkeys(args.configs))})
    result = run_benchmark(settings) | {"command": list(sys.argv)}
    markdown = render_markdown(result)
    print(markdown)
    for path, write, payload in ((args.json, atomic_write_json, result), (args.markdown, atomic_write_text, markdown)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path, payload)
    return 0
