"""The ``biosam2`` command: one sub-command per step of the workflow, each answering ``-h``.

    biosam2 demo                          synthetic data -> check -> train -> predict -> evaluate
    biosam2 convert NAME SRC DST          a public dataset's distribution -> biosam2's format
    biosam2 check-data DATA               validate a dataset, reporting every problem at once
    biosam2 preprocess DATA               write the training cases once into the cache train reads from
    biosam2 train DATA --out RUN          train, select on validation, evaluate on test
    biosam2 predict RUN INPUT OUT         label maps for a file, folder or volume
    biosam2 export RUN OUT.onnx           the whole model as one ONNX file (+ a sidecar JSON)
    biosam2 evaluate PRED GT              mIoU / Dice / HD95 of predictions against ground truth
    biosam2 report RUN                    the visual quality-control report, RUN/report.html
    biosam2 splits DATA --folds 5         nnU-Net's k-fold splits_final.json (then train --fold all)
    biosam2 bench efficiency|accuracy     the efficiency table; the accuracy/ablation grid
    biosam2 selfcheck --device cuda       train, resume, save, predict, compare with the CPU, bench: one line per check

Errors in the user's input are printed as one message (no traceback unless ``--debug``) and the
command exits with status 2; an interrupted command exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

# Choices and defaults come from where they are decided (none of these import torch: -h stays fast).
from biosam2.data.convert import CONVERTERS, SOURCE_LABEL_MAPS, convert_dataset
from biosam2.demo import DEMO_ADAPTERS, DEMO_EPOCHS, run_demo
from biosam2.errors import BioSAM2Error, ConfigError
from biosam2.options import ADAPTERS, BENCHMARKS, INPUT_MODES, LOSSES, POSITIONAL_ENCODINGS, PRECISIONS, SAM2_SIZE_NAMES
from biosam2.training.config import TrainConfig, config_field_names

log = logging.getLogger("biosam2")
CACHE_DIR_HELP = ("preprocessed cache folder (default: DATA/biosam2-cache, or ~/.cache/biosam2/NAME-HASH when DATA is "
                  "read-only); delete it to free the space")


# ---- sub-commands -------------------------------------------------------------------------------
def cmd_check_data(args: argparse.Namespace) -> int:
    from biosam2.data.check import check_dataset

    report = check_dataset(args.data)
    print(report)
    return 0 if report.ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    options = {"source_labels": args.source_labels} if args.source_labels else {}
    summary = convert_dataset(args.name, Path(args.src), Path(args.dst), seed=args.seed, limit=args.limit, overwrite=args.overwrite, **options)
    print(summary)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from biosam2.data.cache import preprocess_dataset

    print(preprocess_dataset(args.data, args.cache_dir, workers=args.workers, progress=not args.no_progress))
    return 0


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user actually gave: on the command line (argparse leaves the others None)
    and in a --config file."""
    import yaml

    given = {}
    if args.config:
        try:
            given = dict(yaml.safe_load(Path(args.config).read_text()) or {})
        except (OSError, yaml.YAMLError, TypeError, ValueError):
            given = {}  # TrainConfig.from_yaml reports the problem
    given.update({name: getattr(args, name) for name in config_field_names() if getattr(args, name, None) is not None})
    return given


def _train_config(args: argparse.Namespace):
    overrides = {name: getattr(args, name) for name in config_field_names() if getattr(args, name, None) is not None}
    if args.config:
        return TrainConfig.from_yaml(args.config, overrides)
    return TrainConfig.from_dict(overrides, "command line")


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from biosam2.errors import ConfigError
    from biosam2.training.run import CONFIG_FILE, train

    if args.fold == "all":
        return _train_all_folds(args)
    config = _train_config(args)
    run = Path(args.out)
    if args.resume and (run / CONFIG_FILE).exists():
        saved = TrainConfig.from_yaml(run / CONFIG_FILE)
        # Compare what the user gave, not what differs from the defaults: `--adapter hp` on a LW run
        # equals the default and must still be refused.
        given = {k: getattr(config, k) for k in _given_options(args) if hasattr(config, k)}
        if "weights" in given and _same_weights(given["weights"], saved.weights):
            given.pop("weights")  # the run saved a local weights path as an absolute one
        epochs = given.pop("epochs", saved.epochs)
        differ = {k: (v, getattr(saved, k)) for k, v in given.items() if getattr(saved, k) != v}
        if epochs < saved.epochs:
            differ["epochs"] = (epochs, saved.epochs)
        if differ:
            raise ConfigError(
                f"{run}: --resume continues with the run's saved config; these options differ from it: "
                + ", ".join(f"{k}={new!r} (run has {old!r})" for k, (new, old) in differ.items())
                + ". Only --epochs may be raised (to extend the run); start a new run (another --out) to change the others"
            )
        config = replace(saved, epochs=epochs)
    summary = train(args.data, run, config, resume=args.resume, progress_bar=not args.no_progress, cache=args.cache, cache_dir=args.cache_dir)
    if summary is not None:  # None in the other processes of a multi-process run
        _print_summary(run, summary)
    return 0


def _train_all_folds(args: argparse.Namespace) -> int:
    """``--fold all``: every fold of splits_final.json into OUT/fold_K, then OUT/folds.json (mean ± std)."""
    import statistics

    from biosam2.atomic_io import atomic_write_json
    from biosam2.data.dataset_format import load_dataset_spec

    folds = load_dataset_spec(args.data).load_splits()
    if not folds:
        raise ConfigError(f"{args.data}: --fold all needs a splits_final.json; write one with `biosam2 splits {args.data}`")
    parent, results = Path(args.out), {}
    for fold in range(len(folds)):
        run = parent / f"fold_{fold}"
        if (run / "metrics.json").is_file() and args.resume:
            print(f"fold {fold}: finished before ({run})")
        else:
            print(f"fold {fold} of {len(folds)}: {run}", flush=True)
            cmd_train(argparse.Namespace(**{**vars(args), "fold": fold, "out": str(run)}))
        results[fold] = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
    if any(summary is None for summary in results.values()):
        return 0  # the other processes of a multi-process run: rank 0 writes the summary
    summary: dict[str, Any] = {"folds": {}, "note": "one run per fold of splits_final.json; mean ± population std over folds"}
    for key, pick in (("best_val_mIoU", lambda m: m.get("best_val_mIoU")), ("test_mIoU", lambda m: (m.get("test") or {}).get("miou"))):
        values = [pick(m) for m in results.values() if pick(m) is not None]
        for fold, metrics in results.items():
            summary["folds"].setdefault(str(fold), {})[key] = pick(metrics)
        if values:
            summary[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}
            print(f"{key}: {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f} over {len(values)} folds")
    atomic_write_json(parent / "folds.json", summary)
    print(f"Written: {parent / 'folds.json'}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from biosam2.data.dataset_format import SPLITS_JSON, load_dataset_spec, write_splits
    from biosam2.data.splits import kfold_splits

    spec = load_dataset_spec(args.data)
    if (spec.root / SPLITS_JSON).exists() and not args.overwrite:
        raise ConfigError(f"{spec.root / SPLITS_JSON} exists (runs may name its folds); --overwrite replaces it")
    folds = kfold_splits([case.case_id for case in spec.list_cases("train")], args.folds, args.seed)
    write_splits(spec.root, folds)
    print(f"Written: {spec.root / SPLITS_JSON}: {len(folds)} folds of "
          f"{', '.join(str(len(f['val'])) for f in folds)} validation cases (nnU-Net's KFold, seed {args.seed})")
    return 0


def _fold(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a fold number, or all") from None


def _same_weights(given: str | None, saved: str | None) -> bool:
    """A relative local weights path given on resume names the absolute one the run saved."""
    if given is None or saved is None:
        return given == saved
    path = Path(given).expanduser()
    return path.exists() and str(path.resolve()) == saved


def _print_summary(run: Path, summary: dict[str, Any]) -> None:
    print(f"\nRun directory: {run}")
    if summary.get("best_val_mIoU") is not None:
        print(f"  best validation mIoU {summary['best_val_mIoU']:.4f} at epoch {summary['best_epoch']}")
    test = summary.get("test")
    if test:
        print(f"  test mIoU {test['miou']:.4f} (hard, background included, over all test pixels)")
    print(f"  model artifact: {run / 'model'}   evaluation: {run / 'evaluation.md'}")


def cmd_export(args: argparse.Namespace) -> int:
    from biosam2.deploy.export import channels_of, export_onnx, sidecar_path
    from biosam2.inference.averaging import load_run_model

    model, metadata = load_run_model(args.run, args.weights)
    path = export_onnx(model, args.out, channels=channels_of(metadata), output=args.output, metadata=metadata, int8=args.int8)
    print(f"wrote {path} and {sidecar_path(path)}")
    return 0


def _onnx_engine(args: argparse.Namespace):
    """``--engine onnxruntime``: an exported .onnx file, or a run exported now to a temporary file."""
    import shutil
    import tempfile

    from biosam2.deploy.export import channels_of, export_onnx
    from biosam2.deploy.onnx_engine import OnnxModel

    if args.precision not in ("auto", "32"):
        raise BioSAM2Error(f"--precision {args.precision}: --engine onnxruntime computes in fp32; leave --precision out")
    source = Path(args.run)
    if source.suffix == ".onnx":
        engine = OnnxModel(source)
        return engine, engine.description
    from biosam2.inference.averaging import load_run_model

    model, metadata = load_run_model(source, args.weights)
    folder = tempfile.mkdtemp(prefix="biosam2-onnx-")
    try:  # the session holds the graph: the file is not needed after
        engine = OnnxModel(export_onnx(model, Path(folder) / "model.onnx", channels=channels_of(metadata), metadata=metadata))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return engine, engine.description


def cmd_predict(args: argparse.Namespace) -> int:
    from biosam2.data.normalization import Normalization
    from biosam2.inference.predict_files import predict_files

    device = args.device
    if (args.ensemble or args.tta) and args.engine == "onnxruntime":
        raise BioSAM2Error("--tta and --ensemble run with the PyTorch engine; leave out --engine onnxruntime")
    if args.engine == "onnxruntime":
        model, metadata = _onnx_engine(args)
        device = device or "cpu"
    else:
        from biosam2.inference.averaging import load_for_prediction

        if Path(args.run).suffix == ".onnx":
            raise BioSAM2Error(f"{args.run}: an ONNX file runs with --engine onnxruntime")
        model, metadata = load_for_prediction(args.run, ensemble=args.ensemble, tta=args.tta, base_weights=args.weights)
    if not metadata.get("normalization"):
        raise BioSAM2Error(f"{args.run}: the artifact does not record its intensity normalisation; was it saved by `biosam2 train`?")
    labels = metadata.get("labels") or {}
    written = predict_files(
        model,
        args.input,
        args.out,
        normalization=Normalization.from_dict(metadata["normalization"]),
        class_names=[n for n, _ in sorted(labels.items(), key=lambda kv: kv[1])] or None,
        probabilities=args.probabilities,
        overlays=args.overlays,
        batch_size=args.batch_size,
        device=device,
        precision=args.precision,
        overwrite=args.overwrite,
        channel_files=args.channel_files,
        channel_names=metadata.get("channel_names"),
        keep_largest=[] if args.no_postprocess else (metadata.get("postprocessing") or {}).get("largest_component"),
    )
    print(f"{len(written)} label map(s) written to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from biosam2.evaluation import evaluate_folders

    predictions, ground_truth = Path(args.predictions), Path(args.ground_truth)
    result = evaluate_folders(predictions, ground_truth, dataset=Path(args.dataset) if args.dataset else None)
    out = Path(args.out) if args.out else predictions.parent / f"{predictions.name}-evaluation"
    result.write_json(out / "evaluation.json")
    result.write_markdown(out / "evaluation.md")
    print(result)
    print(f"\nWritten: {out / 'evaluation.json'}, {out / 'evaluation.md'}")
    if args.report:
        from biosam2.evaluation.html_report import folder_loader, write_report

        images = Path(args.images) if args.images else ground_truth.parent / ground_truth.name.replace("labels", "images")
        if args.images and not images.is_dir():
            raise ConfigError(f"--images {images}: not a folder")
        images = images if images.is_dir() and images != ground_truth else None
        loader = folder_loader(predictions, ground_truth, images)
        path = write_report(Path(args.report), result.to_dict(), loader, title=f"biosam2 evaluation: {predictions}",
                            summary={"predictions": str(predictions), "ground truth": str(ground_truth),
                                     "images": str(images) if images else "none given"},
                            worst=_positive(args.worst, "--worst"))
        print(f"Report: {path}")
    return 0


def _positive(value: int, flag: str) -> int:
    if value < 0:
        raise ConfigError(f"{flag} {value}: give a number of cases, 0 or more")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    from biosam2.evaluation.html_report import report_for_run

    run = Path(args.run)
    if not (run / "run.json").is_file():
        raise ConfigError(f"{run}: not a run directory (no run.json); give the --out folder of biosam2 train")
    if not (run / "evaluation.json").is_file() and not (run / "val_evaluation.json").is_file():
        raise ConfigError(f"{run}: the run has no evaluation yet (evaluation.json or val_evaluation.json): it did not finish")
    print(f"Report: {report_for_run(run, worst=_positive(args.worst, '--worst'))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    run_demo(Path(args.out), adapter=args.adapter, progress_bar=not args.no_progress, **epochs)
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from biosam2.selfcheck import run_selfcheck

    return run_selfcheck(args.device, out=args.out, precision=args.precision, quick=args.quick)


# ---- parser -------------------------------------------------------------------------------------
def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig option. The defaults that -h shows are TrainConfig's own; argparse's stay None,
    so that an option the user did not give is told apart from one given with the default value."""
    defaults = {item.name: item.default for item in fields(TrainConfig)}

    def add(group, flag: str, text: str, *, unset: str | None = None, **kwargs: Any) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        shown = unset if defaults[dest] is None else defaults[dest]
        group.add_argument(flag, dest=dest, help=text if shown is None else f"{text} (default {shown})", **kwargs)

    model = parser.add_argument_group("model")
    add(model, "--size", "SAM2 size", choices=SAM2_SIZE_NAMES)
    add(model, "--weights", "SAM2 weights: hf, pretrained SAM2.1 from the Hugging Face hub or its cache; meta, Meta's "
        "sam2.1_hiera_*.pt; a hub id, a transformers folder or a .pt file; random, for tests")
    add(model, "--adapter", "where training happens", choices=ADAPTERS)
    add(model, "--pos-encoding", "positional encoding", choices=POSITIONAL_ENCODINGS)
    add(model, "--adapter-ratio", "bottleneck width / block width", type=float)
    add(model, "--adapter-scale", "adapter branch weight", type=float)
    add(model, "--adapter-blocks", "comma-separated Hiera block indices", unset="all",
        type=lambda s: [int(v) for v in s.split(",")])
    add(model, "--lora-rank", "LoRA rank (--adapter lora)", type=int)
    add(model, "--lora-alpha", "LoRA alpha (--adapter lora)", type=float)
    add(model, "--input-size", "resize every image to this square (SAM2's own way); training crops are then cut from "
        "the resized image", unset="native resolution", type=int)
    optim = parser.add_argument_group("optimisation (defaults: the paper's recipe)")
    add(optim, "--epochs", "training epochs", type=int)
    add(optim, "--batch-size", "images per step", type=int)
    add(optim, "--lr", "Adam learning rate, cosine schedule to 0", type=float)
    add(optim, "--weight-decay", "Adam weight decay", type=float)
    add(optim, "--loss", "training loss", choices=LOSSES)
    data = parser.add_argument_group("data")
    add(data, "--fold", "fold of splits_final.json; all: every fold into OUT/fold_K, summarised in OUT/folds.json",
        type=_fold)
    add(data, "--patch-size", "training crop size (crop), or size whole images are resized to (resize)", type=int)
    add(data, "--input-mode", "training samples: random crops or whole images resized", choices=INPUT_MODES)
    add(data, "--foreground-share", "share of training samples from a slice with foreground, centred on a foreground pixel (nnU-Net: 0.33)", type=float)
    data.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="disable augmentation")
    add(data, "--limit-train-batches", "cap on steps per epoch", unset="no cap", type=int)
    run = parser.add_argument_group("run")
    add(run, "--seed", "seed of initialisation, split and augmentation", type=int)
    add(run, "--precision", "auto: mixed precision on GPU, fp32 on CPU", choices=PRECISIONS)
    add(run, "--accelerator", "auto, cpu, gpu")
    add(run, "--devices", "auto, a count or a list")
    add(run, "--strategy", "auto, ddp, ...")
    add(run, "--num-nodes", "machines of a multi-node run", type=int)
    add(run, "--num-workers", "data-loading processes", type=int)
    add(run, "--val-every", "epochs between validations", type=int)
    run.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=True,
                     help="recompute encoder blocks in the backward pass: less memory, more time")
    run.add_argument("--no-test", dest="evaluate_test", action="store_const", const=False, help="skip the final test evaluation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biosam2", description="Prompt-free multi-class biomedical segmentation on a frozen SAM2 with dual adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"biosam2 {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the whole workflow on built-in synthetic data (CPU, a few minutes)")
    demo.add_argument("--out", default="biosam2-demo", help="output folder (a fresh one is made if it exists)")
    demo.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEMO_EPOCHS})")
    demo.add_argument("--adapter", default=DEMO_ADAPTERS[0], choices=DEMO_ADAPTERS, help="default %(default)s")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    convert = commands.add_parser("convert", help="write a public dataset in biosam2's (nnU-Net) format")
    convert.add_argument("name", choices=CONVERTERS)
    convert.add_argument("src", help="the dataset as distributed")
    convert.add_argument("dst", help="new dataset folder")
    convert.add_argument("--seed", type=int, default=0, help="seed of the documented random splits")
    convert.add_argument("--limit", type=int, help="keep only the first N cases of each split (quick experiments)")
    convert.add_argument("--source-labels", choices=SOURCE_LABEL_MAPS, help="synapse: what the source's label ids mean")
    convert.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty DST")
    convert.set_defaults(handler=cmd_convert)

    check = commands.add_parser("check-data", help="validate a dataset and report every problem")
    check.add_argument("data")
    check.set_defaults(handler=cmd_check_data)

    preprocess = commands.add_parser(
        "preprocess", help="write the training cases once into the cache that train reads lazily (train does it when needed)"
    )
    preprocess.add_argument("data", help="dataset folder")
    preprocess.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    preprocess.add_argument("--workers", type=int, default=0, help="parallel processes (default: %(default)s, in this one)")
    preprocess.add_argument("--no-progress", action="store_true", help="no progress bar")
    preprocess.set_defaults(handler=cmd_preprocess)

    train = commands.add_parser("train", help="train on a dataset; writes a run directory")
    train.add_argument("data", help="dataset folder (dataset.json, imagesTr/, ...)")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--config", help="YAML file of training options (command-line options override it)")
    train.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--cache-dir", help=CACHE_DIR_HELP)
    train.add_argument("--no-cache", dest="cache", action="store_false",
                       help="load every case into memory instead of the preprocessed cache (small datasets, no spare disk)")
    _add_train_options(train)
    train.set_defaults(handler=cmd_train)

    predict = commands.add_parser("predict", help="predict label maps for a file, a folder or a volume")
    predict.add_argument("run", help="run directory (or model artifact directory; or an exported .onnx with --engine onnxruntime)")
    predict.add_argument("input", help="image, volume or folder")
    predict.add_argument("out", help="output folder (never the input folder)")
    predict.add_argument("--probabilities", action="store_true", help="also write class probabilities")
    predict.add_argument("--overlays", action="store_true", help="also write PNG overlays")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    predict.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: mixed on GPU, fp32 on CPU; bf16-mixed and 16-mixed autocast on the CPU too (default: %(default)s)",
    )
    predict.add_argument("--weights", help="base SAM2 weights, if not found at the path recorded in the artifact")
    predict.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    predict.add_argument("--channel-files", dest="channel_files", action="store_const", const=True, default=None,
                         help="group nnU-Net channel files CASE_0000, CASE_0001, ... into one case CASE (automatic in a dataset's "
                         "imagesTr/imagesTs folder beside dataset.json); otherwise every file is its own image")
    predict.add_argument("--no-postprocess", action="store_true",
                         help="skip the run's postprocessing (largest connected component of the classes where it raised validation Dice)")
    predict.add_argument("--tta", action="store_true", help="test-time augmentation: average the probabilities of the "
                         "4 mirrorings of each image (4x the time)")
    predict.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                         help="more runs (e.g. the folds of --fold all) whose probabilities are averaged with RUN's")
    predict.add_argument("--engine", choices=["pytorch", "onnxruntime"], default="pytorch",
                         help="onnxruntime: run an exported .onnx (or the run, exported first) on the CPU; needs biosam2[deploy]")
    predict.set_defaults(handler=cmd_predict)

    export = commands.add_parser("export", help="write a trained model as one ONNX file and a sidecar JSON")
    export.add_argument("run", help="run directory (or model artifact directory)")
    export.add_argument("out", help="the .onnx file to write (the sidecar is OUT with .json)")
    export.add_argument("--output", choices=["logits", "probabilities", "labels"], default="logits",
                        help="what the graph ends with (default %(default)s; predict --engine onnxruntime needs logits)")
    export.add_argument("--int8", action="store_true",
                        help="dynamic int8 quantisation of the MatMul weights: faster on the CPU, labels agree with fp32 on >= 99%% of pixels")
    export.add_argument("--weights", help="base SAM2 weights, if not found at the path recorded in the artifact")
    export.set_defaults(handler=cmd_export)

    evaluate = commands.add_parser("evaluate", help="mIoU, Dice and HD95 of predictions against ground truth")
    evaluate.add_argument("predictions", help="folder of predicted label maps")
    evaluate.add_argument("ground_truth", help="folder of ground-truth label maps (e.g. DATA/labelsTs)")
    evaluate.add_argument("--dataset", help="dataset folder whose dataset.json names the classes")
    evaluate.add_argument("--out", help="output folder (default: PRED-evaluation beside PRED)")
    evaluate.add_argument("--report", help="also write the visual HTML report here (e.g. report.html)")
    evaluate.add_argument("--images", help="folder of the images, for the report's gallery (default: imagesTs or "
                          "imagesTr beside a labelsTs/labelsTr ground-truth folder, if there)")
    evaluate.add_argument("--worst", type=int, default=8, help="cases shown in the report's gallery, worst first (default: %(default)s)")
    evaluate.set_defaults(handler=cmd_evaluate)
    splits = commands.add_parser("splits", help="write nnU-Net's k-fold splits_final.json for a dataset")
    splits.add_argument("data", help="dataset folder")
    splits.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    splits.add_argument("--seed", type=int, default=12345, help="shuffle seed (default: nnU-Net's %(default)s)")
    splits.add_argument("--overwrite", action="store_true", help="replace an existing splits_final.json")
    splits.set_defaults(handler=cmd_splits)
    report = commands.add_parser("report", help="the visual quality-control report of a run (RUN/report.html)")
    report.add_argument("run", help="run directory (written by biosam2 train)")
    report.add_argument("--worst", type=int, default=8, help="cases shown in the gallery, worst first (default: %(default)s)")
    report.set_defaults(handler=cmd_report)
    bench = commands.add_parser(
        "bench",
        help="benchmarks: efficiency table, accuracy/ablation grid",
        description="biosam2 bench efficiency: parameters, MACs, latency and memory of every variant side by side. "
        "biosam2 bench accuracy: a grid of methods x datasets x seeds through the training pipeline. "
        "`biosam2 bench BENCHMARK -h` lists each one's options.",
    )
    bench.add_argument("benchmark", choices=BENCHMARKS)
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench.set_defaults(handler=cmd_bench)

    selfcheck = commands.add_parser(
        "selfcheck",
        help="does biosam2 work on this machine's GPU? train, resume, predict, GPU vs CPU, bench (a few minutes)",
        description="Trains a tiny model (random SAM2 weights, synthetic data) with mixed precision on the device, resumes "
        "it, loads its artifact, predicts, compares the device's predictions with the CPU's fp32 ones and runs a minimal "
        "`bench efficiency`; prints PASS|FAIL per check and exits 0 only if all passed.",
    )
    selfcheck.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                           help="cuda (default), or cpu: the same checks, comparing bf16-mixed with fp32 on the CPU")
    selfcheck.add_argument("--out", help="output folder (default: a fresh temporary folder; a fresh one beside it if it exists)")
    selfcheck.add_argument("--precision", choices=[p for p in PRECISIONS if p != "auto"],
                           help="training and device-prediction precision (default bf16-mixed; 16-mixed on GPUs without bf16)")
    selfcheck.add_argument("--quick", action="store_true", help="the smallest sizes (seconds on a GPU; what the tests run)")
    selfcheck.set_defaults(handler=cmd_selfcheck)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark modules define their own options; they are imported only when asked for."""
    import importlib

    module = importlib.import_module(f"biosam2.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(prog=f"biosam2 bench {args.benchmark}", description=module.__doc__.split("\n\n")[0])
    module.configure_parser(parser)
    return module.run_from_args(parser.parse_args(args.options))


def _version() -> str:
    from biosam2 import __version__

    return __version__


def _quiet_third_party_logging() -> None:
    """Lightning's banner and tips are noise on the command line. Lightning sets its loggers' levels
    when it is imported, so it is imported first and quietened after."""
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command in ("train", "demo", "bench", "selfcheck"):
        _quiet_third_party_logging()
    try:
        return args.handler(args)
    except BioSAM2Error as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions on an output folder, ...
        if args.debug:
            raise
        print(f"error: {error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``biosam2`` executable: :func:`main` with warnings shown as one line each."""
    if "--debug" not in sys.argv:
        warnings.showwarning = lambda message, category, *_: print(f"warning: {message}", file=sys.stderr)
    sys.exit(main())


if __name__ == "__main__":
    console_main()
