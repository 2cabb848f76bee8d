"""The visual quality-control report: one self-contained HTML file (no network request, images as data
URIs, the sorting script inline) with the summary, the headline metrics, the learning curves, a sortable
per-case table (worst first) and a gallery of the worst and best cases: image | ground truth |
prediction | errors, in the class colours of :mod:`biosam2.visualization`, with their legend.

``report_for_run(RUN)`` writes ``RUN/report.html`` (``train`` does so at its end); ``write_report``
builds one for any predictions against their ground truth (``biosam2 evaluate ... --report``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from biosam2.atomic_io import atomic_write_text

THUMBNAIL_SIDE = 256  # longest side of each gallery panel: a 1,000-case test set stays a few MB
# (image or None, ground truth, prediction, spacing or None) of one case, read only for the gallery.
CaseLoader = Callable[[str], tuple[np.ndarray | None, np.ndarray, np.ndarray, tuple[float, ...] | None]]

_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3;cursor:pointer;user-select:none}td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:13px}.case{margin:10px 0 18px}.bad{background:#fde2e2}.good{background:#e3f6e3}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}dt{color:#666}"""
# Click a header to sort by it (again: the other way); rows without a value stay last. `#sort=KEY` (or
# `#sort=KEY:desc`) in the address sorts on load, through the same click.
_SCRIPT = """function sortBy(th){const t=th.closest('table'),b=t.tBodies[0],i=[...th.parentNode.children].indexOf(th);
const asc=th.dataset.dir!=='asc';[...th.parentNode.children].forEach(h=>delete h.dataset.dir);th.dataset.dir=asc?'asc':'desc';
const v=r=>{const x=r.children[i].dataset.v;return x===undefined?r.children[i].textContent:(x===''?NaN:+x)};
[...b.rows].sort((p,q)=>{const a=v(p),c=v(q);if(typeof a==='string')return asc?a.localeCompare(c):c.localeCompare(a);
if(isNaN(a))return isNaN(c)?0:1;if(isNaN(c))return -1;return asc?a-c:c-a}).forEach(r=>b.appendChild(r))}
document.querySelectorAll('th[data-key]').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
const m=location.hash.match(/^#sort=([^:]+)(:desc)?$/);if(m){const th=document.querySelector(`th[data-key="${m[1]}"]`);
if(th){th.click();if(m[2])th.click()}}"""


def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def case_score(case: dict[str, Any], foreground: list[str]) -> float:
    """Mean foreground Dice of one case over its defined classes (NaN if none): the gallery's ranking."""
    values = [case["dice"][name] for name in foreground if case["dice"].get(name) is not None]
    return float(np.mean(values)) if values else math.nan


def _shrink(image: np.ndarray | None, labels: list[np.ndarray]) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """Every 2-D array at most THUMBNAIL_SIDE on its longest side (labels by nearest neighbour)."""
    step = max(1, math.ceil(max(labels[0].shape) / THUMBNAIL_SIDE))
    return (None if image is None else image[:, ::step, ::step]), [label[::step, ::step] for label in labels]


def gallery_pictures(case_id: str, loader: CaseLoader, class_names: list[str]) -> list[tuple[str, str]]:
    """(caption, data URI) of the panels of one case; for volumes, the slices with the largest error
    and the middle slice."""
    from biosam2.data.dataset_format import IGNORE_INDEX
    from biosam2.visualization import panels

    image, truth, prediction, spacing = loader(case_id)
    if truth.ndim == 2:
        small_image, (small_truth, small_prediction) = _shrink(image, [truth, prediction])
        return [(case_id, _png_uri(panels(small_image, small_truth, small_prediction, class_names, case_id)))]
    wrong = ((truth != prediction) & (truth != IGNORE_INDEX)).reshape(-1, truth.shape[-1]).sum(0)
    chosen = [int(z) for z in np.argsort(-wrong, kind="stable")[:2] if wrong[z] > 0]
    chosen += [truth.shape[-1] // 2] if truth.shape[-1] // 2 not in chosen else []
    spacing_text = "spacing " + " x ".join(f"{s:g}" for s in spacing) if spacing else "no physical spacing"
    pictures = []
    for z in chosen:
        caption = f"{case_id}, slice {z} of {truth.shape[-1]} ({wrong[z]} voxels wrong; {spacing_text})"
        small_image, (small_truth, small_prediction) = _shrink(None if image is None else image[..., z], [truth[..., z], prediction[..., z]])
        pictures.append((caption, _png_uri(panels(small_image, small_truth, small_prediction, class_names, caption))))
    return pictures


def render(evaluation: dict[str, Any], loader: CaseLoader, *, title: str, summary: dict[str, str],
           curves: bytes | None = None, efficiency: dict[str, str] | None = None,
           inference_seconds: dict[str, float] | None = None, note: str | None = None,
           worst: int = 8, best: int = 3) -> str:
    """The report's HTML. ``evaluation``: an ``evaluation.json`` payload; ``loader`` reads a case's pixels."""
    esc = html.escape
    names = evaluation["class_names"]
    foreground, unit = names[1:], evaluation["hd95_unit"]
    cases = sorted(evaluation["cases"], key=lambda c: (math.isnan(s := case_score(c, foreground)), s))  # worst first
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_STYLE}</style>",
             f"</head><body><h1>{esc(title)}</h1>"]
    if note:
        parts.append(f"<p><b>{esc(note)}</b></p>")
    parts.append("<h2>Summary</h2><dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in summary.items()) + "</dl>")
    dice_mean, hd_mean = evaluation["mean_foreground_dice"], evaluation["mean_foreground_hd95"]
    parts.append(
        f"<h2>Metrics over {evaluation['num_cases']} cases</h2><p><b>mIoU as the paper reports it: "
        f"{_number(evaluation['miou'])}</b> (one confusion matrix over every pixel, background included). Mean "
        f"foreground Dice {_number(dice_mean['mean'])} ± {_number(dice_mean['std'])}; mean foreground HD95 "
        f"{_number(hd_mean['mean'], 2)} ± {_number(hd_mean['std'], 2)} {esc(unit)}.{_protocols(evaluation)}</p>"
        "<table><thead><tr><th>class</th>"
        f"<th>IoU</th><th>Dice (mean ± std, n)</th><th>HD95 [{esc(unit)}] (mean ± std, n)</th></tr></thead><tbody>")
    for name, block in evaluation["classes"].items():
        d, h = block["dice"], block["hd95"]
        parts.append(f"<tr><td>{esc(name)}</td><td>{_number(block['iou'])}</td><td>{_number(d['mean'])} ± {_number(d['std'])} "
                     f"({d['count']})</td><td>{_number(h['mean'], 2)} ± {_number(h['std'], 2)} ({h['count']})</td></tr>")
    parts.append(f"</tbody></table><p class='note'>{esc(evaluation['convention'])}</p>")
    parts.append(f"<h2>Cases</h2><p class='note'>Worst first (mean foreground Dice of the case); click a header to sort. "
                 f"<i>absent</i>: the class is in neither ground truth nor prediction (excluded from the means); "
                 f"<i>*</i>: in exactly one of them (Dice 0, HD95 = the case's diagonal).</p>")
    headers = [("case", "case"), ("mean_dice", "mean fg Dice")] + [(f"dice_{n}", f"Dice {n}") for n in foreground]
    headers += [(f"hd95_{n}", f"HD95 {n} [{unit}]") for n in foreground]
    headers += [("seconds", "inference s")] if inference_seconds else []
    parts.append("<table id='cases'><thead><tr>" + "".join(f"<th data-key='{k}'>{esc(t)}</th>" for k, t in headers) + "</tr></thead><tbody>")
    for case in cases:
        cells = [f"<td>{esc(case['case_id'])}</td>", _cell(case_score(case, foreground), 4, shade=True)]
        for metric, digits in (("dice", 4), ("hd95", 2)):
            for name in foreground:
                value, flag = case[metric][name], ""
                if name in case["absent"]:
                    flag = "absent"
                elif name in case["penalised"]:
                    flag = "*"
                cells.append(_cell(value, digits, flag, shade=metric == "dice"))
        if inference_seconds:
            cells.append(_cell(inference_seconds.get(case["case_id"]), 3))
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    chosen = [(c, "worst") for c in cases[:worst]] + [(c, "best") for c in cases[max(worst, len(cases) - best):][::-1]]
    parts.append(f"<h2>Gallery: the {min(worst, len(cases))} worst and {len(chosen) - min(worst, len(cases))} best cases</h2>")
    for case, kind in chosen:
        score = case_score(case, foreground)
        for caption, uri in gallery_pictures(case["case_id"], loader, names):
            parts.append(f"<div class='case'><div class='{'bad' if kind == 'worst' else 'good'}'>{kind}: {esc(caption)}, mean "
                         f"foreground Dice {_number(score)}</div><img alt='{esc(caption)}' src='{uri}'></div>")
    if curves:
        parts.append(f"<h2>Learning curves</h2><img alt='learning curves' src='data:image/png;base64,{base64.b64encode(curves).decode()}'>")
    if efficiency:
        parts.append("<h2>Efficiency</h2><dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in efficiency.items()) + "</dl>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _protocols(evaluation: dict[str, Any]) -> str:
    """The figures other communities report (see biosam2.evaluation.report.PROTOCOLS), if the evaluation has them."""
    protocols = evaluation.get("protocols")
    if not protocols:
        return ""
    transunet, per_image = protocols["transunet"], protocols["per_image"]
    return (f" As others report it: TransUNet's protocol (Synapse) Dice {_number(transunet['mean_dice'])}, HD95 "
            f"{_number(transunet['mean_hd95'], 2)} {html.escape(transunet['hd95_unit'])}; per-image mDice / mIoU (polyp "
            f"literature) {_number(per_image['mdice'])} / {_number(per_image['miou'])}.")


def _cell(value: float | None, digits: int, flag: str = "", shade: bool = False) -> str:
    """A table cell whose ``data-v`` the sorting reads; a Dice is shaded from red (0) to green (1)."""
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    text = flag if flag == "absent" else _number(value, digits) + (" *" if flag == "*" else "")
    style = f" style='background:hsl({120 * value:.0f},70%,85%)'" if shade and not missing else ""
    return f"<td data-v='{'' if missing else value}'{style}>{text}</td>"


def write_report(destination: Path, evaluation: dict[str, Any], loader: CaseLoader, **options: Any) -> Path:
    atomic_write_text(destination, render(evaluation, loader, **options))
    return destination


def folder_loader(predictions: Path, ground_truth: Path, images: Path | None) -> CaseLoader:
    """Reads one case from folders: labels from ``ground_truth`` and ``predictions`` (``CASE.ext``, as the
    evaluation pairs them), the image from ``images`` (``CASE.ext``, or nnU-Net's ``CASE_0000.ext``...) if given."""
    from biosam2.data.cases import channels_first
    from biosam2.data.image_io import file_ending, read_image, read_label

    def index(folder: Path) -> dict[str, list[Path]]:
        files: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_file() and not path.name.startswith(".") and file_ending(path):
                stem = path.name[: -len(file_ending(path))]
                files.setdefault(stem, []).append(path)
                if re.fullmatch(r".+_\d{4}", stem):  # a channel file of nnU-Net's layout
                    files.setdefault(stem[:-5], []).append(path)
        return files

    folders = {"truth": index(ground_truth), "prediction": index(predictions), "image": index(images) if images else {}}

    def load(case_id: str):
        truth = read_label(folders["truth"][case_id][0])
        prediction = read_label(folders["prediction"][case_id][0]).array
        files = folders["image"].get(case_id)
        image = np.concatenate([channels_first(read_image(path)) for path in files], axis=0) if files else None
        return image, truth.array, prediction, truth.spacing if truth.is_volume and truth.spacing_known else None

    return load


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def report_for_run(run: Path, worst: int = 8) -> Path:
    """``RUN/report.html`` from the run directory: its test evaluation, or its validation one (said so)."""
    import yaml

    from biosam2.data.dataset_format import load_dataset_spec

    info = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    config = yaml.safe_load((run / "config.yaml").read_text())
    spec = load_dataset_spec(info["dataset"])
    test = (run / "evaluation.json").is_file()
    stem, labels, images = ("", "labelsTs", "imagesTs") if test else ("val_", "labelsTr", "imagesTr")
    evaluation = json.loads((run / f"{stem}evaluation.json").read_text())
    parameters = metrics.get("parameters") or {}
    summary = {
        "dataset": f"{info.get('dataset_name') or spec.name} ({info['dataset']})",
        "split": f"{info['split']['note']}: {len(info['split']['train'])} train, {len(info['split']['val'])} validation, "
                 f"{len(info['split'].get('test') or [])} test cases",
        "evaluated": f"{'test' if test else 'validation'} split, {evaluation['num_cases']} cases",
        "model": f"SAM2 {config['size']}, adapter {config['adapter']}, positional encoding {config['pos_encoding']}, "
                 f"weights {config['weights']}",
        "parameters": f"{parameters.get('trainable', 0):,} trainable of {parameters.get('total', 0):,}" if parameters else "?",
        "training": f"{metrics.get('epochs_trained', '?')} epochs, best validation mIoU {_number(metrics.get('best_val_mIoU'))} "
                    f"(epoch {metrics.get('best_epoch', '?')}), {metrics.get('seconds', 0) / 60:.1f} min in all",
    }
    seconds = (metrics.get("test") or {}).get("inference_seconds") if test else metrics.get("val_inference_seconds")
    efficiency = {"artifact (model/)": f"{_size(run / 'model') / 2**20:.1f} MiB"}
    if seconds:
        efficiency["inference per case"] = (f"median {np.median(list(seconds.values())):.3f} s, max {max(seconds.values()):.3f} s "
                                            "(measured during this run's prediction of these cases)")
    curves = (run / "curves.png").read_bytes() if (run / "curves.png").is_file() else None
    note = None if test else "No test evaluation in this run (--no-test or no labelled test cases): this report shows the validation cases."
    loader = folder_loader(run / f"{stem or 'test_'}predictions", spec.root / labels, spec.root / images)
    return write_report(run / "report.html", evaluation, loader, title=f"biosam2 report: {run.name}", summary=summary,
                        curves=curves, efficiency=efficiency, inference_seconds=seconds, note=note, worst=worst)
