"""Peak memory of predicting one very large 2-D image, tiled versus whole.

    python benchmarks/inference_memory.py --side 4000            # tiled (biosam2's default above 2048 px)
    python benchmarks/inference_memory.py --side 2048 --whole    # one forward pass, for comparison

Each measurement runs in a fresh child process and reports its peak resident memory (ru_maxrss)
above the memory the process had after building the model, plus the wall time. Random tiny SAM2 +
LW fused, 4 classes, CPU unless --device cuda (then torch.cuda.max_memory_allocated is reported too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import time
import warnings


def measure(side: int, whole: bool, tile: int, device: str, queue) -> None:
    import numpy as np
    import torch

    import biosam2
    from biosam2.inference.predictor import Predictor

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = biosam2.build_model("tiny", weights="random", num_classes=4, adapter="lw").eval().reparameterize()
    image = np.random.default_rng(0).random((3, side, side), dtype=np.float32)
    predictor = Predictor(model, device=device, max_side=10**9 if whole else 2048, tile_size=tile)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    labels, _ = predictor.predict(image)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "side": side,
        "mode": "whole" if whole else f"tiled {tile}px, overlap 0.25",
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "rss_above_model_mib": round((peak - baseline) / 1024, 1),
        "output_shape": list(labels.shape),
    }
    if device.startswith("cuda"):
        result["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, nargs="+", default=[4000])
    parser.add_argument("--whole", action="store_true", help="one forward pass instead of tiles")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"# {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, device {args.device}")
    for side in args.side:
        queue = context.Queue()
        child = context.Process(target=measure, args=(side, args.whole, args.tile, args.device, queue))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(json.dumps({"side": side, "failed": f"exit code {child.exitcode}"}))
            continue
        print(json.dumps(queue.get()))


if __name__ == "__main__":
    main()
