"""The HTML quality-control report: its content against evaluation.json, 2-D and 3-D galleries, the
runs that write it, the command line, and the file opened in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from biosam2.cli import main
from biosam2.data.image_io import write_label_png
from biosam2.data.synthetic import write_synthetic_dataset
from biosam2.evaluation import evaluate_folders
from biosam2.evaluation.html_report import case_score, folder_loader, write_report
from biosam2.training.config import TrainConfig
from biosam2.training.run import train
from biosam2.visualization import ERROR_COLOURS, class_colour, write_overlay

QUICK = dict(weights="random", adapter="lw", epochs=1, batch_size=2, patch_size=64, lr=1e-3, num_workers=0, overlays=1)
NAMES = ["background", "cell", "nucleus"]


def _labels_2d(folder: Path) -> tuple[Path, Path, Path]:
    """Three 2-D cases with known scores: a perfect one, one with nucleus missed, one with a spurious nucleus."""
    truth, prediction, images = folder / "labelsTs", folder / "pred", folder / "imagesTs"
    for path in (truth, prediction, images):
        path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        gt = np.zeros((40, 60), np.uint8)
        gt[5:25, 5:30] = 1
        pred = gt.copy()
        if index == 1:
            gt[30:36, 40:50] = 2  # nucleus in the ground truth only: Dice 0, penalised
        if index == 2:
            pred[30:36, 40:50] = 2  # nucleus predicted only
            pred[5:10, 5:30] = 0  # and part of the cell missed
        write_label_png(truth / f"case{index}.png", gt)
        write_label_png(prediction / f"case{index}.png", pred)
        Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)).save(images / f"case{index}_0000.png")
    return truth, prediction, images


def test_report_holds_every_case_with_the_evaluations_numbers_and_nothing_external(tmp_path):
    truth, prediction, images = _labels_2d(tmp_path)
    evaluation = evaluate_folders(prediction, truth, labels={"background": 0, "cell": 1, "nucleus": 2}).to_dict()
    path = write_report(tmp_path / "report.html", evaluation, folder_loader(prediction, truth, images),
                        title="t", summary={"data": "three cases"}, worst=1, best=1)
    text = path.read_text()
    assert f"{evaluation['miou']:.4f}" in text and "three cases" in text
    rows = re.findall(r"<tr><td>(case\d)</td><td data-v='([^']*)'[^>]*>", text)
    # worst first: case2 (a spurious nucleus, Dice 0, and part of the cell missed), then case1 (nucleus
    # missed: Dice 1 and 0), then the perfect case0
    scores = {case["case_id"]: case_score(case, NAMES[1:]) for case in evaluation["cases"]}
    assert [case for case, _ in rows] == sorted(scores, key=scores.get) == ["case2", "case1", "case0"]
    assert [float(v) for _, v in rows] == pytest.approx(sorted(scores.values()))
    for case in evaluation["cases"]:
        assert f"{case['dice']['cell']:.4f}" in text
    assert text.count("0.0000 *") == 2  # the missed and the spurious nucleus: penalised, marked
    assert text.count("'>absent</td>") == 2  # case0 has no nucleus in either: Dice and HD95 absent, excluded
    # one gallery picture each for the worst and the best case, embedded
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 2
    assert "worst: case2" in text and "best: case0" in text
    assert not re.search(r"(src|href)=['\"](https?:)?//", text) and "http://" not in text and "https://" not in text


def test_3d_gallery_shows_the_slices_with_most_error_and_the_middle_one_with_spacing(tmp_path):
    truth, prediction = tmp_path / "labelsTs", tmp_path / "pred"
    truth.mkdir()
    prediction.mkdir()
    gt = np.zeros((20, 20, 9), np.uint8)
    gt[5:15, 5:15, 1:8] = 1
    pred = gt.copy()
    pred[5:15, 5:15, 2] = 0  # 100 voxels wrong on slice 2
    pred[5:10, 5:15, 6] = 0  # 50 on slice 6
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(gt, affine), truth / "vol.nii.gz")
    nib.save(nib.Nifti1Image(pred, affine), prediction / "vol.nii.gz")
    evaluation = evaluate_folders(prediction, truth, labels={"background": 0, "organ": 1}).to_dict()
    text = write_report(tmp_path / "r.html", evaluation, folder_loader(prediction, truth, None), title="t", summary={}).read_text()
    captions = re.findall(r"worst: (vol, slice \d+ of 9 \(\d+ voxels wrong; [^)]*\))", text)
    assert captions == ["vol, slice 2 of 9 (100 voxels wrong; spacing 0.8 x 0.8 x 2.5)",
                        "vol, slice 6 of 9 (50 voxels wrong; spacing 0.8 x 0.8 x 2.5)",
                        "vol, slice 4 of 9 (0 voxels wrong; spacing 0.8 x 0.8 x 2.5)"]


def test_overlays_have_a_title_row_and_a_legend_in_the_class_colours(tmp_path):
    image = np.full((1, 30, 40), 100.0)
    labels = np.zeros((30, 40), np.int64)
    labels[5:15, 5:15] = 1
    write_overlay(tmp_path / "case.png", image, labels, labels, ["background", "vessel"])
    picture = np.asarray(Image.open(tmp_path / "case.png").convert("RGB"))
    assert picture.shape[0] > 30 + 2 * 12  # a title row above, a legend below
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert class_colour(1) in colours and all(colour in colours for colour in ERROR_COLOURS.values())
    # the first class is not drawn in red (it must stand out on red tissue: endoscopy, fundus, H&E)
    red, green, blue = class_colour(1)
    assert not (red > 150 and green < 100 and blue < 100)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train=4, val=2, test=2, max_side=80)
    root = tmp_path_factory.mktemp("runs")
    train(data, root / "tested", TrainConfig(**QUICK), progress_bar=False)
    train(data, root / "untested", TrainConfig(**QUICK, evaluate_test=False), progress_bar=False)
    return root / "tested", root / "untested", data


def test_train_writes_the_report_of_its_test_cases(runs):
    run, _, _ = runs
    text = (run / "report.html").read_text()
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert all(f"<td>{case['case_id']}</td>" in text for case in evaluation["cases"])
    assert "test split, 2 cases" in text and "inference s" in text and "MiB" in text
    seconds = json.loads((run / "metrics.json").read_text())["test"]["inference_seconds"]
    assert set(seconds) == {case["case_id"] for case in evaluation["cases"]} and all(s > 0 for s in seconds.values())
    assert "Learning curves" in text


def test_a_run_without_test_reports_its_validation_cases_and_says_so(runs):
    _, run, _ = runs
    text = (run / "report.html").read_text()
    validation = json.loads((run / "val_evaluation.json").read_text())
    assert {case["case_id"] for case in validation["cases"]} == set(json.loads((run / "run.json").read_text())["split"]["val"])
    assert "this report shows the validation cases" in text and "validation split, 2 cases" in text
    assert not (run / "evaluation.json").exists()


def test_report_and_evaluate_report_on_the_command_line(runs, tmp_path, capsys):
    run, _, data = runs
    (run / "report.html").unlink()
    assert main(["report", str(run), "--worst", "1"]) == 0
    assert "best:" in (run / "report.html").read_text()
    assert main(["evaluate", str(run / "test_predictions"), str(data / "labelsTs"), "--out", str(tmp_path / "ev"),
                 "--report", str(tmp_path / "ev.html")]) == 0
    text = (tmp_path / "ev.html").read_text()
    assert f"images</dt><dd>{data / 'imagesTs'}" in text  # found beside labelsTs
    assert main(["report", str(tmp_path)]) == 2  # not a run directory: a clear error
    assert "not a run directory" in capsys.readouterr().err


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def _headless(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([_chromium(), *flags, *arguments], capture_output=True, text=True, timeout=120, check=True)


def test_the_report_of_a_real_run_renders_and_sorts_in_headless_chromium(runs, tmp_path):
    run, _, _ = runs
    url = (run / "report.html").resolve().as_uri()
    _headless(tmp_path, "--window-size=1200,1600", f"--screenshot={tmp_path / 'shot.png'}", url)
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"), dtype=np.float32)
    assert shot.shape == (1600, 1200) and shot.std() > 20  # text, tables and images, not a blank page
    # sorting through the header's click handler (which #sort=KEY triggers): by case id, each way
    def order(fragment: str) -> list[str]:
        dom = _headless(tmp_path, "--dump-dom", url + fragment).stdout
        table = dom[dom.index('<table id="cases"'):]
        return re.findall(r"<tr><td>([^<]+)</td>", table[: table.index("</table>")])

    ascending, descending = order("#sort=case"), order("#sort=case:desc")
    assert len(ascending) == 2 and ascending == sorted(ascending) and descending == ascending[::-1]


def test_a_3d_run_reports_slices_with_the_spacing(tmp_path):
    root = tmp_path / "vol"
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    affine = np.diag([0.7, 0.7, 2.0, 1])
    for index in range(6):
        split = "Tr" if index < 5 else "Ts"
        image = rng.normal(size=(32, 32, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / f"images{split}" / f"c{index}_0000.nii.gz")
        nib.save(nib.Nifti1Image((image > 0.5).astype(np.uint8), affine), root / f"labels{split}" / f"c{index}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".nii.gz", "numTraining": 5}))
    run = tmp_path / "run"
    train(root, run, TrainConfig(**{**QUICK, "patch_size": 32, "overlays": 0}), progress_bar=False)
    text = (run / "report.html").read_text()
    assert re.search(r"worst: c5, slice \d of 6 \(\d+ voxels wrong; spacing 0.7 x 0.7 x 2\)", text), text[-3000:]
    assert "<td>c5</td>" in text and "[mm]" in text
