"""Timing and peak memory of one provider on one shape, in a child process of its own.

Each (provider, shape) runs in a fresh spawned process, so that resident-memory growth on CPU is the
provider's own, a crash or an out-of-memory kill ends only that measurement, and compilation caches
or CUDA state do not leak from one provider into the next. For each mode the child warms up, times,
then measures peak memory.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch

from bench.one_teacher import PROVIDERS_BY_TEACHERS
from bench.providers import LossSettings, Unavailable
from bench.shapes import Shape

MODES = ("forward", "forward+backward")
# glibc maps an allocation afresh (and unmaps it on free) only above a threshold that grows with use
# up to 32 MiB; below it, freed heap memory stays resident and its reuse never shows as growth.
# Fixing the threshold at process start makes every buffer above 128 KiB its own mapping, as all
# buffers of realistic shapes (N×V float32 > 32 MiB) are anyway, so small shapes measure like large.
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2, so every timed call starts from DRAM


@dataclass(frozen=True)
class TimingPlan:
    warmup: int  # untimed calls first: compilation, autotuning, page faults of first touch
    repeats: int  # timed calls wanted
    budget_s: float  # stop once this much time is spent and at least MIN_REPEATS calls are timed


MIN_REPEATS = 3


@dataclass(frozen=True)
class Job:
    provider: str
    shape: Shape
    dtype: str
    device: str
    modes: tuple[str, ...]
    settings: LossSettings
    plan: TimingPlan


@dataclass
class Outcome:
    """One mode's result: ``status`` is ok, out of memory, error, crashed or timeout."""

    status: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    detail: str = ""


# --- the child ------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_arguments() -> tuple:
    return ()


def _time_cpu(call, plan: TimingPlan, prepare=_no_arguments) -> list[float]:
    """Wall time of ``call(*prepare())``; ``prepare`` (the provider's student input) is not timed."""
    times = []
    started = time.perf_counter()
    while len(times) < plan.repeats and (len(times) < MIN_REPEATS or time.perf_counter() - started < plan.budget_s):
        arguments = prepare()
        begin = time.perf_counter()
        call(*arguments)
        times.append(time.perf_counter() - begin)
        del arguments
    return times


def _time_cuda(call, plan: TimingPlan, device: torch.device, prepare=_no_arguments) -> list[float]:
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(plan.repeats)]
    for start, end in events:
        arguments = prepare()
        flush.zero_()
        start.record()
        call(*arguments)
        end.record()
        del arguments
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}; CPU peak memory needs Linux.")


def _cpu_peak_growth(call, prepare=_no_arguments) -> int:
    """Resident-memory high-water mark during ``call(*prepare())`` minus resident memory before it,
    the prepared arguments included (Linux)."""
    arguments = prepare()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size
    before = _proc_status_bytes("VmRSS")
    outputs = call(*arguments)
    peak = _proc_status_bytes("VmHWM")
    del outputs
    return peak - before


def _cuda_peak_growth(call, device: torch.device, prepare=_no_arguments) -> int:
    """max_memory_allocated during ``call(*prepare())`` minus what was allocated before it (the inputs)."""
    arguments = prepare()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    outputs = call(*arguments)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del outputs
    return peak - before


def _is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError of torch's CPU allocator ("DefaultCPUAllocator: ...")."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "DefaultCPUAllocator" in str(error)


def _failure(error: BaseException) -> Outcome:
    if _is_out_of_memory(error):
        return Outcome("out of memory", detail=str(error).splitlines()[0] if str(error) else type(error).__name__)
    last_line = traceback.format_exception_only(type(error), error)[-1].strip()
    return Outcome("error", detail=last_line)


def _call_step(step, backward: bool, *inputs):
    return step(*inputs, backward)


def _measure_modes(job: Job) -> dict[str, Outcome]:
    device = torch.device(job.device)
    provider = PROVIDERS_BY_TEACHERS[job.settings.teachers][job.provider]
    try:
        inputs = provider.inputs(job.shape, getattr(torch, job.dtype), device)
    except Unavailable as reason:
        return {mode: Outcome("unavailable", detail=str(reason)) for mode in job.modes}
    step = provider.make(job.settings)

    def prepare():  # untimed, and counted as input in peak memory
        return provider.student_input(inputs[0]), *inputs[1:]

    outcomes = {}
    for mode in job.modes:
        call = functools.partial(_call_step, step, mode != "forward")
        try:
            for _ in range(job.plan.warmup):
                call(*prepare())
                _synchronize(device)
            if device.type == "cuda":
                outcomes[mode] = Outcome("ok", _time_cuda(call, job.plan, device, prepare),
                                         _cuda_peak_growth(call, device, prepare))
            else:
                outcomes[mode] = Outcome("ok", _time_cpu(call, job.plan, prepare), _cpu_peak_growth(call, prepare))
        except Exception as error:  # an unavailable kernel or an OOM is a result, not a crash of the sweep
            outcomes[mode] = _failure(error)
        gc.collect()
    return outcomes


def _child_main(connection, job: Job) -> None:
    try:
        connection.send(_measure_modes(job))
    except Exception as error:  # inputs that do not fit, for example
        connection.send({mode: _failure(error) for mode in job.modes})
    finally:
        connection.close()


def copy_bandwidth_bytes_per_s(device_name: str) -> float:
    """Achievable memory bandwidth: bytes read plus written per second by a large tensor copy."""
    device = torch.device(device_name)
    n_bytes = (2**30 if device.type == "cuda" else 2**28)
    source = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    plan = TimingPlan(warmup=2, repeats=10, budget_s=2.0)
    for _ in range(plan.warmup):
        target.copy_(source)
    call = functools.partial(target.copy_, source)
    times = _time_cuda(call, plan, device) if device.type == "cuda" else _time_cpu(call, plan)
    return 2 * n_bytes / float(np.median(times))


def device_description(device_name: str) -> str:
    device = torch.device(device_name)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def _probe_main(connection, device_name: str) -> None:
    try:
        connection.send((device_description(device_name), copy_bandwidth_bytes_per_s(device_name)))
    finally:
        connection.close()


# --- the parent -----------------------------------------------------------------------------------


def _run_in_child(target, args, timeout_s: float):
    """``target(connection, *args)`` in a spawned process; returns what it sent, or the reason it sent nothing."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(sender, *args))
    with mock.patch.dict(os.environ, CHILD_ENVIRONMENT):  # the spawned interpreter inherits it at start
        process.start()
    sender.close()  # so that a child that dies closes the pipe and poll() wakes up
    try:
        if not receiver.poll(timeout_s):
            process.kill()
            process.join()
            return None, "timeout", f"no result after {timeout_s:.0f} s"
        return receiver.recv(), "ok", ""
    except EOFError:
        process.join()
        detail = f"the process exited with code {process.exitcode}"
        if process.exitcode == -9:
            detail += " (SIGKILL: usually the kernel's out-of-memory killer)"
        return None, "crashed", detail
    finally:
        process.join()
        receiver.close()


def measure(job: Job, timeout_s: float) -> dict[str, Outcome]:
    """Times and peak memory of ``job`` for each of its modes, measured in a fresh process."""
    result, status, detail = _run_in_child(_child_main, (job,), timeout_s)
    if result is None:
        return {mode: Outcome(status, detail=detail) for mode in job.modes}
    return result


def probe_device(device_name: str, timeout_s: float) -> tuple[str, float]:
    """(description of the device, copy bandwidth in bytes/s), measured in a fresh process."""
    result, status, detail = _run_in_child(_probe_main, (device_name,), timeout_s)
    if result is None:
        raise RuntimeError(f"measuring the copy bandwidth on {device_name} failed: {status}, {detail}")
    return result
