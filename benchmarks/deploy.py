"""PyTorch eager vs ONNX Runtime on the CPU: median latency (interleaved rounds) and peak memory.

    python benchmarks/deploy.py [--run RUN] [--sizes 256 512 1024] [--rounds 15] [--markdown OUT.md]
                                [--nnunet-data DATASET [--nnunet-plans nnUNetPlans.json]]

The model is tiny SAM2 + LW adapters, fused (random SAM2 weights unless ``--run`` names a trained run).
Every round runs each engine once, back to back, at one size: the CPU is shared, so the ratio of two
engines within a round is what to compare; medians over rounds are reported (the order of the engines
rotates from round to round). Engines:

- ``pytorch``: the model in eval mode under ``torch.no_grad`` (torch's default threads);
- ``ort``: ONNX Runtime with its defaults (all graph optimisations, one thread per core);
- ``ort-basic``: ONNX Runtime with basic graph optimisations only (the lever the issue names);
- ``ort-int8``: dynamic int8 quantisation of the exported file (MatMul weights), only with ``--run``:
  its labels are compared with fp32's on the run's test images, and it is kept only if they agree on
  at least 99% of the pixels and it is faster. The file is made as ``biosam2 export --int8`` makes it;
- ``nnunet`` (with ``--nnunet-data``): the 2-D network nnU-Net v2 plans for that dataset (its own
  planner and builder, ``biosam2.baselines.nnunet``; deep supervision off), in eval mode under
  ``torch.no_grad``, randomly initialised (weights do not change its speed), on a grey input.

With ``--nnunet-data`` a second table compares whole-image prediction of the dataset's first test
image (imagesTs, else imagesTr), from its uint8 array to its label map: biosam2's ``Predictor`` as
``biosam2 predict`` runs it (normalisation, one forward pass, argmax, the label map it writes), with the
PyTorch model and with the exported files, against nnU-Net's default predictor (``nnUNetPredictor``:
sliding window with step 0.5, Gaussian weighting, mirroring on both axes, CPU, its preprocessing and
resampling back), built with ``manual_initialization`` around the same random planned network instead
of a trained model folder. nnU-Net is planned into a temporary workspace (about 20 s) unless
``--nnunet-plans`` gives the plans file of an earlier planning.

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
    if engine in ("pytorch", "nnunet"):  # nnunet: model is nnU-Net's planned network
        def call(x):
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
        return call
    session = made[engine]
    return lambda x: session.run(None, {"images": x})[0]


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


def nnunet_setup(data: Path, plans_file: str | None):
    """nnU-Net's plans for ``data`` (planned now, unless ``plans_file`` is given), its 2-D network (random
    weights, eval), its number of input channels, and its default predictor around that network."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from biosam2.baselines.nnunet import plan_and_preprocess, planned_network

    if plans_file:
        plans = json.loads(Path(plans_file).read_text())
    else:
        plans = plan_and_preprocess(data, Path(tempfile.mkdtemp(prefix="biosam2-deploy-nnunet-")), "2d")
    network = planned_network(plans, data, "2d").eval()
    dataset_json = json.loads((data / "dataset.json").read_text())
    manager = PlansManager(plans)
    # nnUNetv2_predict's defaults (as biosam2.baselines.nnunet.predict), around the untrained network:
    # manual_initialization stands in for a trained model folder
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, manager, manager.get_configuration("2d"), [network.state_dict()],
                                    dataset_json, "nnUNetTrainer", inference_allowed_mirroring_axes=(0, 1))
    return plans, network, len(dataset_json["channel_names"]), predictor


def whole_image_calls(data: Path, predictor_nnunet, model, paths: dict[str, Path], made: dict):
    """Whole-image prediction of the dataset's first test image, uint8 array to label map, per engine;
    returns the image and the calls."""
    from biosam2.data.normalization import Normalization
    from biosam2.deploy.onnx_engine import OnnxModel
    from biosam2.inference.predict_files import find_inputs, load_input, normalization_for
    from biosam2.inference.predictor import Predictor

    image = (sorted((data / "imagesTs").glob("*_0000.*")) or sorted((data / "imagesTr").glob("*_0000.*")))[0]
    normalization = Normalization.from_dict(json.loads((data / "dataset.json").read_text()).get("normalization") or {"scheme": "uint8"})
    raw, _ = load_input(find_inputs(image)[0])
    engines = {"pytorch": model}
    for engine, path in paths.items():
        engines[engine] = OnnxModel(path, threads=THREADS)
        engines[engine].session = made[engine]  # the single pass's session of the same file (spinning off)
    calls = {}
    for engine, network in engines.items():
        def call(network=network):
            predictor = Predictor(network, device="cpu", precision="32")
            labels, _ = predictor.predict_2d(normalization_for(raw, normalization, image).apply(raw)[None])
            return predictor.finish(labels[0])
        calls[f"biosam2 {engine}"] = call
    reader = predictor_nnunet.plans_manager.image_reader_writer_class()
    array, properties = reader.read_images([str(image)])  # nnU-Net's own reader: its axis order and spacing
    calls["nnU-Net predictor"] = lambda: predictor_nnunet.predict_single_npy_array(array, properties)
    mirrorings = 2 ** len(predictor_nnunet.allowed_mirroring_axes) if predictor_nnunet.use_mirroring else 1
    forward_passes = len(predictor_nnunet._internal_get_sliding_window_slicers(array.shape[1:])) * mirrorings
    return image, raw.shape[-2:], forward_passes, calls


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, round after round, the order rotating so that no engine always runs first."""
    names = list(calls)
    times = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the per-round ratio numerator / denominator."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


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
    parser.add_argument("--nnunet-data", help="a biosam2 dataset (nnU-Net raw format): add nnU-Net's planned 2-D network and predictor")
    parser.add_argument("--nnunet-plans", help="with --nnunet-data: its nnUNetPlans.json from an earlier planning (skips planning)")
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
        int8 = export_onnx(model, folder / "model-int8.onnx", channels=channels, int8=True)  # as `export --int8`
        made = sessions(path, ["ort", "ort-int8"], int8)
        agree = agreement(args.run, runner("ort", None, made), runner("ort-int8", None, made), channels)
        notes.append(f"int8 (dynamic, MatMul weights) labels agree with fp32's on {agree:.4%} of the run's test pixels")
        if agree >= 0.99:
            engines.append("ort-int8")
    made = sessions(path, engines, int8)
    calls = {engine: runner(engine, model, made) for engine in engines}
    nnunet = None
    if args.nnunet_data:
        plans, network, nnunet_channels, nnunet_predictor = nnunet_setup(Path(args.nnunet_data), args.nnunet_plans)
        planned = plans["configurations"]["2d"]
        nnunet = f"{len(planned['architecture']['arch_kwargs']['features_per_stage'])} stages, " \
                 f"{sum(p.numel() for p in network.parameters()) / 1e6:.1f} M parameters, patch {planned['patch_size']}"
        engines.append("nnunet")
        calls["nnunet"] = runner("nnunet", network, made)
        notes.append(f"nnunet: the 2-D network nnU-Net v2 plans for {args.nnunet_data}: {nnunet}, randomly initialised, "
                     f"deep supervision off, eval, no_grad, {nnunet_channels} input channel(s)")
    rows = []
    for size in args.sizes:
        rng = np.random.default_rng(size)
        x = rng.random((1, channels, size, size), dtype=np.float32)
        inputs = {engine: x for engine in engines}
        if nnunet:
            inputs["nnunet"] = rng.random((1, nnunet_channels, size, size), dtype=np.float32)
            calls["nnunet"](inputs["nnunet"])  # warm-up, as the comparisons below are for the other engines
        reference = calls["pytorch"](x)
        for engine in engines[1:]:
            if engine != "nnunet":
                difference = float(np.abs(calls[engine](x) - reference).max())
                notes.append(f"{size}x{size} {engine}: max |logits - PyTorch's| = {difference:.2g}")
        times = interleaved({engine: (lambda e=engine, inputs=inputs: calls[e](inputs[e])) for engine in engines}, args.rounds)
        for engine in engines:
            speedup = ratio(times, "pytorch", engine)
            versus = ratio(times, engine, "nnunet") if nnunet else None
            memory = None if args.no_memory or engine == "nnunet" else peak_memory(
                engine, size, int8 if engine == "ort-int8" else path, args.run, channels)
            rows.append((size, engine, statistics.median(times[engine]) * 1000, speedup, versus, memory))
            print(f"{size} {engine}: {rows[-1][2]:.0f} ms, {speedup:.2f}x faster than PyTorch"
                  + (f", {versus:.2f}x nnU-Net's time" if nnunet else "") + f", peak {memory} MiB", flush=True)
    whole = []
    if nnunet:
        paths = {"ort": path, **({"ort-int8": int8} if "ort-int8" in engines else {})}
        image, shape, passes, whole_calls = whole_image_calls(Path(args.nnunet_data), nnunet_predictor, model, paths, made)
        for call in whole_calls.values():
            call()  # warm-up
        times = interleaved(whole_calls, args.rounds)
        for engine in whole_calls:
            whole.append((engine, statistics.median(times[engine]) * 1000, ratio(times, engine, "nnU-Net predictor")))
            print(f"whole image {engine}: {whole[-1][1]:.0f} ms, {whole[-1][2]:.2f}x nnU-Net's time", flush=True)
        notes.append(f"whole image: {image.name} ({shape[0]}x{shape[1]}), uint8 array to label map; nnU-Net's predictor "
                     f"runs its network {passes} times on it (sliding-window tiles x mirrorings); biosam2's once")
    lines = [
        f"`python benchmarks/deploy.py {' '.join(sys.argv[1:])}`",
        "",
        (f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, ORT threads {THREADS or 'default'}, "
         f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
         f"{'trained run ' + args.run if args.run else 'random SAM2 weights'}; tiny SAM2 + LW fused; batch 1; "
         f"{args.rounds} interleaved rounds"),
        "",
        "| size | engine | median latency (ms) | PyTorch / engine (median of per-round ratios) |"
        + (" engine / nnunet (median of per-round ratios) |" if nnunet else "") + " peak RSS (MiB, fresh process) |",
        "|---|---|---|---|" + ("---|" if nnunet else "") + "---|",
        *(f"| {s} | {e} | {t:.0f} | {r:.2f}x |" + (f" {v:.2f}x |" if nnunet else "") + f" {'' if m is None else f'{m:.0f}'} |"
          for s, e, t, r, v, m in rows),
    ]
    if whole:
        lines += [
            "",
            "Whole-image prediction (one image, interleaved rounds):",
            "",
            "| engine | median latency (ms) | engine / nnU-Net predictor (median of per-round ratios) |",
            "|---|---|---|",
            *(f"| {e} | {t:.0f} | {v:.2f}x |" for e, t, v in whole),
        ]
    lines += ["", *(f"- {note}" for note in notes)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
