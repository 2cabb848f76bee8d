"""Peak memory of `predict` on one large RGB image, as a function of its size.

    python benchmarks/inference_memory.py --size 2000x1500 4000x3000 8000x6000
    python benchmarks/inference_memory.py --size 4000x3000 --probabilities     # also writes probabilities
    python benchmarks/inference_memory.py --size 2048x2048 --max-side 4096    # one forward pass, untiled

Each size runs in a fresh child process through the user's path (`predict_files`: PNG read,
normalisation, tiled prediction, PNG written). It reports the process's peak resident memory above
its memory after building the model and predicting one small image (the peak is reset through
/proc/self/clear_refs, so earlier peaks do not hide it), in MiB and in bytes per image pixel. Random
tiny SAM2 + LW fused, 4 classes, CPU. The model's own activations depend on the tile, not the image:
the part that grows with the image is the bytes per pixel.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
import warnings
from pathlib import Path

NUM_CLASSES = 4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(image_path: str, tile: int, max_side: int, probabilities: bool, queue) -> None:
    import numpy as np
    import torch

    import biosam2
    from biosam2.data.normalization import Normalization
    from biosam2.inference.predict_files import predict_files
    from biosam2.inference.predictor import Predictor

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = biosam2.build_model("tiny", weights="random", num_classes=NUM_CLASSES, adapter="lw").eval().reparameterize()
    Predictor(model, device="cpu").predict(np.zeros((3, 64, 64), dtype=np.float32))  # thread pools, allocator
    with tempfile.TemporaryDirectory() as out:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak (VmHWM) to the current RSS
        baseline = _status_kib("VmRSS")
        started = time.perf_counter()
        predict_files(model, image_path, Path(out) / "pred", normalization=Normalization("uint8"),
                      probabilities=probabilities, device="cpu", precision="32", max_side=max_side, tile_size=tile)
        seconds = time.perf_counter() - started
        peak = _status_kib("VmHWM")
    queue.put({"seconds": round(seconds, 1), "peak_rss_mib": round(peak / 1024, 1), "above_model_mib": round((peak - baseline) / 1024, 1),
               "above_model_bytes": (peak - baseline) * 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", default=["4000x3000"], help="WIDTHxHEIGHT of the RGB image(s)")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--max-side", type=int, default=2048, help="images with a larger side are tiled (biosam2's default)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probabilities (.npy, float32)")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    context = multiprocessing.get_context("spawn")
    print(f"# {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, cpu, tile {args.tile}, "
          f"max side {args.max_side}, probabilities {args.probabilities}")
    for size in args.size:
        width, height = (int(v) for v in size.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            image_path = Path(folder) / "large.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path, compress_level=1)
            queue = context.Queue()
            child = context.Process(target=measure, args=(str(image_path), args.tile, args.max_side, args.probabilities, queue))
            child.start()
            child.join()
        if child.exitcode != 0:
            print(json.dumps({"size": size, "failed": f"exit code {child.exitcode}"}))
            continue
        result = queue.get()
        pixels = width * height
        print(json.dumps({"size": size, "megapixels": round(pixels / 1e6, 1), **{k: v for k, v in result.items() if k != "above_model_bytes"},
                          "bytes_per_pixel_above_model": round(result["above_model_bytes"] / pixels, 1)}))


if __name__ == "__main__":
    main()
