"""How much two biosam2 jobs sharing a small CPU slow each other, with and without OpenMP spinning.

    python benchmarks/cpu_sharing.py            # tiny SAM2 + LW, 256 px, 8 timed forward passes per job

Runs one job alone, then two at once, each with the default OpenMP wait policy and with
OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning while they wait), and prints each job's
mean latency per forward pass. Each job is a fresh process, because OpenMP reads the
policy once, when it starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

JOB = """
import time, warnings, torch
warnings.simplefilter("ignore")
import biosam2
torch.manual_seed(0)
model = biosam2.build_model("tiny", weights="random", num_classes=2, adapter="lw").eval()
images = torch.rand(1, 3, {side}, {side})
with torch.inference_mode():
    model(images)  # warm-up
    started = time.perf_counter()
    for _ in range({runs}):
        model(images)
print(f"{{(time.perf_counter() - started) / {runs} * 1000:.0f}}")
"""


def run_jobs(count: int, passive: bool, side: int, runs: int) -> list[str]:
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    code = JOB.format(side=side, runs=runs)
    jobs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    return [job.communicate()[0].strip() + " ms" for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs; tiny SAM2 + LW at {args.side} px; mean latency of {args.runs} forward passes per job")
    for passive in (False, True):
        policy = "OMP_WAIT_POLICY=PASSIVE" if passive else "default OpenMP wait policy"
        print(f"{policy}: alone {run_jobs(1, passive, args.side, args.runs)[0]}; "
              f"two at once {', '.join(run_jobs(2, passive, args.side, args.runs))}")


if __name__ == "__main__":
    main()
