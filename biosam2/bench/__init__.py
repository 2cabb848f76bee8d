"""Benchmarks: ``biosam2 bench efficiency`` (:mod:`.efficiency`, MACs counted by :mod:`.flops`) and
``biosam2 bench accuracy`` (:mod:`.accuracy`). They measure and tabulate; targets are checked by scripts
under ``benchmarks/`` that read their JSON. No heavy imports here: the CLI's ``-h`` stays fast."""

import datetime
import os
import platform


def describe_machine() -> dict:
    """What the numbers were measured on."""
    import torch
    import transformers

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": gpus, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
