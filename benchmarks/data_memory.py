"""Memory and speed of the training data pipeline: the preprocessed cache against cases held in memory.

    python benchmarks/data_memory.py [--counts 8 32 128] [--shape 160 160 64] [--out benchmarks/data-memory-cpu.md]

1. For N synthetic CT-like volumes (int16, biosam2.data.synthetic.write_synthetic_volumes), a short
   `train` in a fresh process (random SAM2-tiny weights, LW, 2 steps, validation of 1 volume, 2 loader
   workers): peak RSS of the main process, peak RSS and PSS summed over it and its workers (sampled
   every 0.1 s from /proc), and the time from the start of train() to the end of the first step. Three
   ways: `--no-cache` (every case in memory: biosam2 before the cache), the cache built by the run,
   and the cache already built.
2. The loader alone: samples/s of 256-px crops with augmentation from the cache, 0/2/4 workers, batch 8,
   against the training step time of SAM2-tiny (LW, batch 8, 256 px) measured here on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = "biosam2-cache"
sys.path.insert(0, str(REPO))

TRAIN = r"""
import json, sys, threading, time, psutil
start = time.time()
peaks = {"main_rss": 0, "tree_rss": 0, "tree_pss": 0}
def sample():
    me = psutil.Process()
    while True:
        procs = [me, *me.children(recursive=True)]
        rss = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss; pss += info.pss
            if p is me: peaks["main_rss"] = max(peaks["main_rss"], info.rss)
        peaks["tree_rss"] = max(peaks["tree_rss"], rss); peaks["tree_pss"] = max(peaks["tree_pss"], pss)
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
from biosam2.training import TrainConfig, train
from biosam2.training.run import Callback
first = {}
class FirstStep(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, index):
        first.setdefault("s", time.time() - begin)
config = TrainConfig(weights="random", adapter="lw", epochs=1, batch_size=8, patch_size=256, num_workers=2, overlays=0,
                     limit_train_batches=2, evaluate_test=False)
begin = time.time()
train(sys.argv[1], sys.argv[2], config, progress_bar=False, callbacks=[FirstStep()], cache=sys.argv[3] == "cache", cache_dir=sys.argv[4])
time.sleep(0.2)
print(json.dumps({**{k: v / 2**20 for k, v in peaks.items()}, "first_step_s": first["s"]}))
"""


def run_train(data: Path, run: Path, cache: bool, cache_dir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", TRAIN, str(data), str(run), "cache" if cache else "memory", str(cache_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=run.parent, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_table(counts: list[int], shape: tuple[int, int, int], work: Path, datasets: list[Path]) -> list[str]:
    from biosam2.data.synthetic import write_synthetic_volumes

    rows = ["| dataset | source on disk | cache on disk | mode | main RSS peak | tree RSS peak | tree PSS peak | time to first step |",
            "|---|---|---|---|---|---|---|---|"]
    for index, count in enumerate([*counts, *datasets]):
        if isinstance(count, Path):  # a real dataset, e.g. ACDC (biosam2 convert acdc ...): cached where --cache-dir says
            data = count
        else:
            data = write_synthetic_volumes(work / f"ct{count}", train=count, val=1, shape=shape)
        source = sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and CACHE not in p.parts) / 1e6
        for mode, cache in (("in memory (--no-cache)", False), ("cache, built by the run", True), ("cache, ready", True)):
            cache_dir = work / f"cache{index}"  # the first cached mode builds it, the second finds it ready
            measured = run_train(data, work / f"run{len(rows)}", cache, cache_dir)
            cached = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / 1e6 if cache else 0
            name = f"{count} volumes" if isinstance(count, int) else data.name
            rows.append(f"| {name} | {source:.0f} MB | {f'{cached:.0f} MB' if cache else '-'} | {mode} | {measured['main_rss']:.0f} MB | "
                        f"{measured['tree_rss']:.0f} MB | {measured['tree_pss']:.0f} MB | {measured['first_step_s']:.1f} s |")
            print(rows[-1], flush=True)
    return rows


def throughput_table(work: Path, steps: int) -> list[str]:
    import torch
    from torch.utils.data import DataLoader

    from biosam2.data.cache import cached_cases, preprocess
    from biosam2.data.cases import resolve_normalization
    from biosam2.data.dataset_format import load_dataset_spec
    from biosam2.data.splits import resolve_split
    from biosam2.data.synthetic import write_synthetic_volumes
    from biosam2.data.training_data import EpochSeededSampler, SliceDataset
    from biosam2.model.factory import build_model

    data = write_synthetic_volumes(work / "ct512", train=4, val=1, shape=(512, 512, 48))
    spec = load_dataset_spec(data)
    split = resolve_split(spec, 0, 0)
    normalization = resolve_normalization(spec, split.train)
    folder, _ = preprocess(spec, split.train, normalization.scheme, progress=False)
    dataset = SliceDataset(cached_cases(folder, spec, split.train, normalization), patch_size=256, augment=True)
    rows = ["| loader | samples/s | batch of 8 every |", "|---|---|---|"]
    for workers in (0, 2, 4):
        loader = DataLoader(dataset, batch_size=8, sampler=EpochSeededSampler(len(dataset), 0), num_workers=workers)
        batches = iter(loader)
        next(batches)  # workers started
        began, count = time.perf_counter(), 0
        for _ in range(steps):
            count += len(next(batches)[0])
        rate = count / (time.perf_counter() - began)
        rows.append(f"| {workers} workers, 512x512 slices -> 256-px augmented crops | {rate:.0f} | {8 / rate * 1000:.0f} ms |")
        print(rows[-1], flush=True)
    model = build_model(num_classes=3, size="tiny", adapter="lw", weights="random")
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images, labels = torch.rand(8, 1, 256, 256), torch.randint(0, 3, (8, 256, 256))
    times = []
    for _ in range(4):
        began = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - began)
    step = sorted(times[1:])[len(times[1:]) // 2]
    rows.append(f"| SAM2-tiny LW training step, batch 8, 256 px, CPU ({torch.get_num_threads()} threads) | {8 / step:.1f} | {step * 1000:.0f} ms |")
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--skip-loader", action="store_true", help="only the memory table")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 160, 64])
    parser.add_argument("--dataset", type=Path, nargs="*", default=[], help="real datasets too (e.g. ACDC after biosam2 convert acdc)")
    parser.add_argument("--loader-steps", type=int, default=20, help="batches timed per loader setting")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        memory = memory_table(args.counts, tuple(args.shape), Path(work), args.dataset)
        speed = [] if args.skip_loader else throughput_table(Path(work), args.loader_steps)
    if args.out:
        command = "python benchmarks/data_memory.py " + " ".join(sys.argv[1:])
        args.out.write_text("\n".join([
            "# Data pipeline: memory and speed (CPU)", "", f"Command: `{command}`", "",
            f"Machine: {os.cpu_count()} CPU cores, shared with other jobs while this ran, so times are upper bounds.",
            "", f"## Memory, {'x'.join(map(str, args.shape))} int16 volumes", "", *memory, "",
            *(["## Loader throughput", "", *speed, ""] if speed else []),
        ]))


if __name__ == "__main__":
    main()
