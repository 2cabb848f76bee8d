"""PyTorch eager vs ONNX Runtime on the CPU: median latency (interleaved rounds) and peak memory.

    python benchmarks/deploy.py [--run RUN] [--sizes 256 512 1024] [--rounds 15] [--markdown OUT.md]

The model is tiny SAM2 + LW adapters, fused (random SAM2 weights unless ``--run`` names a trained run).
Every round runs each engine once, back to back, at one size: the CPU is shared, so the ratio of two
engines within a round is what to compare; medians over rounds are reported. Engines:

- ``pytorch``: the model in eval mode under ``torch.no_grad`` (torch's default threads);
- ``ort``: ONNX Runtime with its defaults (all graph optimisations, one thread per core);
- ``ort-basic``: ONNX Runtime with basic graph optimisations only (the lever the issue names);
- ``ort-int8``: dynamic int8 quantisation of the exported file (MatMul weights), only with ``--run``:
  its labels are compared with fp32's on the run's test images, and it is kept only if they agree on
  at least 99% of the pixels and it is faster.

Peak memory: each engine runs once more at each size in a fresh process; its peak resident set
(ru_maxrss) is reported, model and runtime included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def build(run: str | None):
    import biosam2
    from biosam2.model.factory import load_model

    if run:
        artifact = Path(run) / "model" if (Path(run) / "model").is_dir() else Path(run)
        return load_model(artifact).eval().reparameterize(inplace=False), 1
    return biosam2.build_model("tiny", weights="random", num_classes=4, adapter="lw").eval().reparameterize(), 3


THREADS: int | None = None  # --threads: both engines' intra-op threads (None: each one's default)


def sessions(path: Path, engines: list[str], int8: Path | None):
    import onnxruntime as ort

    made = {}
    for engine in engines:
        if not engine.startswith("ort"):
            continue
        options = ort.SessionOptions()
        # ORT's pool threads otherwise spin-wait after each run, taking the cores from the engine that runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if THREADS:
            options.intra_op_num_threads = THREADS
        if engine == "ort-basic":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        made[engine] = ort.InferenceSession(str(int8 if engine == "ort-int8" else path), options, providers=["CPUExecutionProvider"])
    return made


def runner(engine: str, model, made):
    if engine == "pytorch":
        def call(x):
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        return call
    session = made[engine]
    return lambda x: session.run(None, {"images": x})[0]


def quantize(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("model-int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    return out


def agreement(run: str, fp32, int8, channels: int) -> float:
    """Share of pixels whose int8 label equals fp32's, over the run's test (or training) images."""
    from biosam2.data.image_io import read_image

    data = Path(json.loads((Path(run) / "model" / "biosam2.json").read_text())["metadata"]["dataset"])
    images = sorted((data / "imagesTs").glob("*.png")) or sorted((data / "imagesTr").glob("*.png"))
    same = total = 0
    for path in images:
        array = read_image(path).array.astype(np.float32) / 255.0
        x = np.ascontiguousarray(array.reshape(1, channels, *array.shape[-2:]) if array.ndim == 2 else np.moveaxis(array, -1, 0)[None])
        a, b = fp32(x).argmax(1), int8(x).argmax(1)
        same, total = same + int((a == b).sum()), total + a.size
    return same / total


def peak_memory(engine: str, size: int, path: Path, run: str | None, channels: int) -> float:
    """Peak RSS (MiB) of a fresh process that loads the engine and runs one image of ``size``."""
    out = subprocess.run(
        [sys.executable, __file__, "--_child", engine, str(size), str(path), str(channels), *(["--run", run] if run else []),
         *(["--threads", str(THREADS)] if THREADS else [])],
        capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def child(args) -> None:
    engine, size, path, channels = args._child
    model = build(args.run)[0] if engine == "pytorch" else None
    call = runner(engine, model, sessions(Path(path), [engine], Path(path) if engine == "ort-int8" else None))
    call(np.random.rand(1, int(channels), int(size), int(size)).astype(np.float32))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (big) parent process
    status = Path("/proc/self/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained LW run (default: random weights; int8 is measured only with a run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, help="intra-op threads of both engines (default: each one's own)")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        return child(args)
    from biosam2.deploy.export import export_onnx

    model, channels = build(args.run)
    folder = Path(tempfile.mkdtemp(prefix="biosam2-deploy-bench-"))
    path = export_onnx(model, folder / "model.onnx", channels=channels)
    engines = ["pytorch", "ort", "ort-basic"]
    notes = []
    int8 = None
    if args.run:
        int8 = quantize(path)
        made = sessions(path, ["ort", "ort-int8"], int8)
        agree = agreement(args.run, runner("ort", None, made), runner("ort-int8", None, made), channels)
        notes.append(f"int8 (dynamic, MatMul weights) labels agree with fp32's on {agree:.4%} of the run's test pixels")
        if agree >= 0.99:
            engines.append("ort-int8")
    made = sessions(path, engines, int8)
    calls = {engine: runner(engine, model, made) for engine in engines}
    rows = []
    for size in args.sizes:
        x = np.random.default_rng(size).random((1, channels, size, size), dtype=np.float32)
        reference = calls["pytorch"](x)
        for engine in engines[1:]:
            difference = float(np.abs(calls[engine](x) - reference).max())
            notes.append(f"{size}x{size} {engine}: max |logits - PyTorch's| = {difference:.2g}")
        times = {engine: [] for engine in engines}
        for _ in range(args.rounds):
            for engine in engines:
                start = time.perf_counter()
                calls[engine](x)
                times[engine].append(time.perf_counter() - start)
        for engine in engines:
            ratio = statistics.median(p / e for p, e in zip(times["pytorch"], times[engine]))
            memory = None if args.no_memory else peak_memory(engine, size, int8 if engine == "ort-int8" else path, args.run, channels)
            rows.append((size, engine, statistics.median(times[engine]) * 1000, ratio, memory))
            print(f"{size} {engine}: {rows[-1][2]:.0f} ms, {ratio:.2f}x faster than PyTorch, peak {memory} MiB", flush=True)
    lines = [
        f"`python benchmarks/deploy.py {' '.join(sys.argv[1:])}`",
        "",
        (f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, ORT threads {THREADS or 'default'}, "
         f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
         f"{'trained run ' + args.run if args.run else 'random SAM2 weights'}; tiny SAM2 + LW fused; batch 1; "
         f"{args.rounds} interleaved rounds"),
        "",
        "| size | engine | median latency (ms) | PyTorch / engine (median of per-round ratios) | peak RSS (MiB, fresh process) |",
        "|---|---|---|---|---|",
        *(f"| {s} | {e} | {t:.0f} | {r:.2f}x | {'' if m is None else f'{m:.0f}'} |" for s, e, t, r, m in rows),
        "",
        *(f"- {note}" for note in notes),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
