"""Timing, peak memory, dense matmul throughput and the machine's description, on CPU or CUDA.

Timing
    ``time_runs`` runs a callable back to back with the garbage collector paused (as ``timeit``
    does), synchronising CUDA before starting and after finishing each run, so a run's time is the
    wall time of its kernels and not of their launch. It stops at ``max_runs`` runs, or earlier once
    it has ``min_runs`` runs and ``budget_s`` seconds have been spent: a few runs of a 10-s forward,
    many of a 50-ms one.

    On CPU each run also records its *CPU share*: process CPU time / (wall time x torch threads).
    It is close to 1 when the process had its cores (idle OpenMP threads spin, so they count too)
    and drops when other processes took them; one preempted thread stalls a whole parallel region,
    so such a run measures the other processes, not the model. With ``min_cpu_share`` set, a run
    below it is set aside (kept in ``Timing.contended_ms``) and re-timed, up to ``2 x max_runs`` extra
    attempts, each after waiting (:class:`IdleWaiter`, bounded) for the CPUs to be idle, i.e. for the
    other processes to finish; if no run reaches the share, all runs are kept and the low share is
    reported.

Peak memory (:class:`PeakMemory`), one definition on both devices
    peak = bytes of the tensors resident before the measured call (weights, buffers, optimizer
    state, inputs: counted from the tensors themselves, each storage once) + the largest increase of
    live tensor bytes during the call.

    - CUDA: the increase is ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
      after ``torch.cuda.reset_peak_memory_stats()`` (the caching allocator's own bookkeeping).
    - CPU: there is no allocator statistic, so the increase is computed from ``torch.profiler``
      memory events (``profile_memory=True``): every allocation and free made through torch's CPU
      allocator, replayed in time order; the largest running sum is the peak increase. This counts
      tensors exactly, like the CUDA figure, and like it leaves out what does not go through torch's
      allocator: oneDNN/MKL scratch buffers, allocator fragmentation, Python objects, shared libraries.
      It is not the process's RSS.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# kineto (behind torch.profiler, used below for CPU peak memory) logs a "gpuGetDeviceCount failed"
# ERROR on machines without a GPU; it is harmless and alarms users. Read at the profiler's first use.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times of repeated runs, in milliseconds (see the module docstring for ``cpu_share``)."""

    runs_ms: list[float]
    cpu_share: float | None = None  # over the kept runs; None on CUDA
    contended_ms: list[float] = field(default_factory=list)  # runs set aside for a low CPU share

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def minimum(self) -> float:
        return min(self.runs_ms)

    @property
    def maximum(self) -> float:
        return max(self.runs_ms)

    def quartiles(self) -> tuple[float, float] | None:
        """First and third quartiles (inclusive method); None with fewer than 4 runs, where they mean little."""
        if len(self.runs_ms) < 4:
            return None
        q1, _, q3 = statistics.quantiles(self.runs_ms, n=4, method="inclusive")
        return q1, q3

    def to_json(self) -> dict[str, Any]:
        quartiles = self.quartiles()
        return {
            "median_ms": self.median,
            "min_ms": self.minimum,
            "max_ms": self.maximum,
            "q1_ms": quartiles[0] if quartiles else None,
            "q3_ms": quartiles[1] if quartiles else None,
            "runs": len(self.runs_ms),
            "runs_ms": self.runs_ms,
            "cpu_share": self.cpu_share,
            "contended_runs_ms": self.contended_ms,
        }


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat; None where there is no such file."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields[:8])


def wait_for_idle_cpu(max_wait_s: float, min_idle: float = 0.85, sample_s: float = 1.0) -> float:
    """Wait (at most ``max_wait_s``) until the CPUs are at least ``min_idle`` idle over ``sample_s``;
    returns the seconds waited. Called between runs, when this process computes nothing, so what
    keeps the CPUs busy is other processes: after a contended run it lets a transient job (a test
    run, a build) finish instead of re-timing straight into it."""
    started = time.perf_counter()
    while (left := max_wait_s - (time.perf_counter() - started)) > 0:
        before = _cpu_times()
        time.sleep(min(sample_s, max(left, 0.05)))
        after = _cpu_times()
        if before is None or after is None or after[1] <= before[1]:
            break  # no /proc/stat: cannot tell, do not wait
        if (after[0] - before[0]) / (after[1] - before[1]) >= min_idle:
            break
    return time.perf_counter() - started


class IdleWaiter:
    """Waits for idle CPUs after contended runs (:func:`wait_for_idle_cpu`), at most ``per_wait_s`` at a
    time and ``total_s`` over a whole benchmark, so that a machine that never calms down costs a
    bounded delay (its timings are then reported with their low CPU share)."""

    def __init__(self, per_wait_s: float, total_s: float):
        self.per_wait_s = per_wait_s
        self.remaining_s = total_s
        self.waited_s = 0.0

    def wait(self) -> float:
        allowed = min(self.per_wait_s, self.remaining_s)
        if allowed <= 0:
            return 0.0
        waited = wait_for_idle_cpu(allowed)
        self.remaining_s -= waited
        self.waited_s += waited
        return waited


def time_runs(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    max_runs: int,
    min_runs: int = 1,
    budget_s: float = float("inf"),
    min_cpu_share: float | None = None,
    waiter: IdleWaiter | None = None,
) -> Timing:
    """Time ``fn()`` (already warmed up) up to ``max_runs`` times; see the module docstring.

    After a run set aside for a low CPU share, ``waiter`` (if any) waits for the CPUs to be idle.
    """
    if max_runs < 1 or min_runs < 1:
        raise ValueError("max_runs and min_runs must be at least 1")
    on_cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    kept: list[tuple[float, float]] = []  # (wall ms, CPU share)
    set_aside: list[tuple[float, float]] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        while len(kept) < max_runs and len(set_aside) < 2 * max_runs:
            if len(kept) >= min_runs and time.perf_counter() - started >= budget_s:
                break
            synchronize(device)
            begin, begin_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall = time.perf_counter() - begin
            share = (time.process_time() - begin_cpu) / (wall * threads) if on_cpu and wall > 0 else 1.0
            contended = on_cpu and min_cpu_share is not None and share < min_cpu_share
            (set_aside if contended else kept).append((1e3 * wall, share))
            if contended and waiter is not None:
                waiter.wait()
    finally:
        if gc_was_enabled:
            gc.enable()
    if not kept:  # every run was contended: report them all, with their low share
        kept, set_aside = set_aside, []
    cpu_share = None
    if on_cpu:
        total_ms = sum(ms for ms, _ in kept)
        cpu_share = sum(ms * share for ms, share in kept) / total_ms if total_ms > 0 else None
    return Timing([ms for ms, _ in kept], cpu_share, [ms for ms, _ in set_aside])


@dataclass
class InterleavedTiming:
    """Rounds of back-to-back runs of several callables: ``rounds_ms[i][name]`` is ``name``'s time in round i.

    Comparing two callables round by round (the ratio of their times in the same round) cancels the
    slow drift of a shared or thermally throttled machine that separate medians, taken minutes
    apart, keep; it resolves differences of a few percent.
    """

    names: list[str]
    rounds_ms: list[dict[str, float]]
    contended_rounds_ms: list[dict[str, float]] = field(default_factory=list)  # set aside: a run lacked its cores
    all_contended: bool = False  # no round got its cores: ``rounds_ms`` holds contended rounds

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        return [r[numerator] / r[denominator] for r in self.rounds_ms]

    def to_json(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "rounds_ms": self.rounds_ms,
            "contended_rounds_ms": self.contended_rounds_ms,
            "all_contended": self.all_contended,
        }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    rounds: int,
    min_cpu_share: float | None = None,
    waiter: IdleWaiter | None = None,
) -> InterleavedTiming:
    """Time every callable once per round, the order rotating from round to round (no position is
    favoured); a round where a run got less than ``min_cpu_share`` of its cores is redone (after
    ``waiter`` waited for idle CPUs), at most ``rounds`` times in all."""
    names = list(fns)
    kept: list[dict[str, float]] = []
    contended: list[dict[str, float]] = []
    threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        while len(kept) < rounds and len(contended) < rounds:
            shift = (len(kept) + len(contended)) % len(names)
            times: dict[str, float] = {}
            lacked_cores = False
            for name in names[shift:] + names[:shift]:
                synchronize(device)
                begin, begin_cpu = time.perf_counter(), time.process_time()
                fns[name]()
                synchronize(device)
                wall = time.perf_counter() - begin
                times[name] = 1e3 * wall
                if device.type == "cpu" and min_cpu_share is not None and wall > 0:
                    lacked_cores |= (time.process_time() - begin_cpu) / (wall * threads) < min_cpu_share
            (contended if lacked_cores else kept).append({name: times[name] for name in names})
            if lacked_cores and waiter is not None:
                waiter.wait()
    finally:
        if gc_was_enabled:
            gc.enable()
    if not kept:  # never got the cores: report what was measured, marked as such
        return InterleavedTiming(names, contended, [], all_contended=True)
    return InterleavedTiming(names, kept, contended)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage is counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


class PeakMemory:
    """``with PeakMemory(device, resident_bytes) as memory: ...``; then ``memory.peak_bytes``.

    See the module docstring for the definition and how it is measured on each device.
    """

    def __init__(self, device: torch.device, resident_bytes: int):
        self.device = device
        self.resident_bytes = resident_bytes
        self.increase_bytes: int | None = None
        self._profiler: torch.profiler.profile | None = None
        self._start_allocated = 0

    @property
    def peak_bytes(self) -> int:
        if self.increase_bytes is None:
            raise RuntimeError("PeakMemory has not been exited yet")
        return self.resident_bytes + self.increase_bytes

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_allocated = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=False
            )
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.increase_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start_allocated)
            return
        assert self._profiler is not None
        self._profiler.__exit__(*exc)
        events = [
            event
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        ]
        self._profiler = None
        self.increase_bytes = peak_running_sum((e.start_ns(), e.nbytes()) for e in events)


def peak_running_sum(events: Iterable[tuple[int, int]]) -> int:
    """Largest running sum (at least 0) of signed byte counts replayed in time order."""
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


# ---- the machine ---------------------------------------------------------------------------------
@dataclass
class MatmulThroughput:
    """Dense matmul throughput of one dtype: GFLOP/s of each timed product."""

    dtype: str
    size: int
    runs_gflops: list[float]

    @property
    def median_gflops(self) -> float:
        return statistics.median(self.runs_gflops)

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "size": self.size,
            "median_gflops": self.median_gflops,
            "min_gflops": min(self.runs_gflops),
            "max_gflops": max(self.runs_gflops),
            "runs_gflops": self.runs_gflops,
        }


def matmul_throughput(
    device: torch.device, dtype: torch.dtype, size: int, runs: int = 10, min_cpu_share: float | None = None
) -> MatmulThroughput:
    """Dense ``size x size`` matmul throughput, GFLOP/s (2 n^3 FLOPs per product), after 2 warm-up runs."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        timing = time_runs(lambda: torch.mm(a, b), device, max_runs=runs, min_runs=runs, min_cpu_share=min_cpu_share)
    flops = 2.0 * size**3
    return MatmulThroughput(str(dtype).removeprefix("torch."), size, [flops / (ms * 1e6) for ms in timing.runs_ms])


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (versions, threads, CPU/GPU model)."""
    import torchvision
    import transformers

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_model_name(),
        "cpu_count": _cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other processes competing for the
    cores inflate and scatter CPU timings, so every row records it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()
