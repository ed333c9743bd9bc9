"""Compile every Triton kernel specialization ahead of time and report registers, spills, shared memory.

    python -m aropd_kernels.triton.compile_report --arch 80 --arch 90

No GPU is needed: each specialization is compiled with ``triton.compile`` for a ``GPUTarget`` and
Triton's bundled ``ptxas``, whose verbose log gives the registers and spill bytes. A specialization
is one kernel (the fused rows kernel or a shard stage), one choice of its constexprs (teacher count,
divergence, diagnostics with the labels' log-probabilities, gradient), a launch configuration that
:func:`~aropd_kernels.triton.launch.launch_config` can return, and a dtype set (student and teachers,
as the public API takes them). Integer arguments get the divisibility-by-16 specialization
that the usual vocabulary sizes (128256, 152064, 262208) and contiguous logits get at run time.
Exits 1 on any compile error or any spill.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

from ..backends import _triton_interpreter_enabled

DIVERGENCES = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}
# (student, partial and full teacher): uniform dtypes, and half-precision students with float32 teachers.
DTYPE_SETS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp16", "fp32"))
# One teacher and the shard stages run the same sweeps as the anchored fused kernel; fewer dtype sets
# keep the report's runtime down: uniform float32 and bfloat16 (and a bfloat16 student with a float32
# teacher for the one-teacher fused kernel, the usual mixed case).
ONE_TEACHER_DTYPE_SETS = (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))
STAGE_DTYPE_SETS = (("fp32", "fp32"), ("bf16", "bf16"))
# report name -> kernel name in kernels.py
KERNELS = {
    "rows": "anchored_residual_rows_kernel",
    "normalizers": "shard_normalizers_kernel",
    "target_sums": "shard_target_sums_kernel",
    "mixture_sums": "shard_mixture_sums_kernel",
    "gradient": "shard_gradient_kernel",
}
_FLOAT_SCALARS = ("lam", "clip", "beta")
_POINTER_TYPES = {"active_ptr": "*i1", "labels_ptr": "*i64", "normalizers_ptr": "*fp32", "sums_ptr": "*fp64",
                  "terms_ptr": "*fp64", "mixture_ptr": "*fp64", "row_temperature_ptr": "*fp32",
                  "grad_scale_ptr": "*fp32", "row_loss_ptr": "*fp32", "diagnostics_ptr": "*fp32"}


class Specialization(NamedTuple):
    """One compile: a kernel, its constexprs (those it does not take are ignored), dtypes and launch."""

    arch: int
    kernel: str  # a key of KERNELS
    teachers: int  # 2: anchored (student, partial, full); 1: ONE_TEACHER (student, teacher)
    divergence: str
    with_diagnostics: bool
    write_grad: bool
    student_dtype: str
    teacher_dtype: str
    block_v: int
    num_warps: int

    def kernel_function(self):
        from . import kernels

        return getattr(kernels, KERNELS[self.kernel])

    def constexprs(self) -> dict:
        values = {"DIVERGENCE": DIVERGENCES[self.divergence], "WITH_DIAGNOSTICS": self.with_diagnostics,
                  "WRITE_GRAD": self.write_grad, "ONE_TEACHER": self.teachers == 1, "BLOCK_V": self.block_v}
        return {name: value for name, value in values.items() if name in self.kernel_function().arg_names}

    def describe(self) -> str:
        flags = self.constexprs()
        words = [f"teachers={self.teachers}"]
        if "DIVERGENCE" in flags:
            words.append(self.divergence)
        words += [f"{name}={int(flags[key])}" for name, key in (("diag", "WITH_DIAGNOSTICS"), ("grad", "WRITE_GRAD"))
                  if key in flags]
        words += [f"{self.student_dtype}/{self.teacher_dtype}", f"BLOCK_V={self.block_v}", f"warps={self.num_warps}"]
        return " ".join(words)


class Report(NamedTuple):
    specialization: Specialization
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    error: str | None


def specializations(arches: list[int], widest_block_only: bool = False) -> list[Specialization]:
    """The anchored fused kernel over every dtype set, the one-teacher one over ONE_TEACHER_DTYPE_SETS,
    each shard stage (both teacher counts) over STAGE_DTYPE_SETS; every launch configuration and each
    constexpr a kernel takes."""
    from .launch import MAX_BLOCK_V, all_launch_configs

    configs = [config for config in all_launch_configs() if config.block_v == MAX_BLOCK_V or not widest_block_only]

    def product(kernel, teacher_counts, divergences, diagnostics, grads, dtype_sets):
        return [Specialization(arch, kernel, teachers, divergence, with_diagnostics, write_grad, student, teacher,
                               config.block_v, config.num_warps)
                for arch, teachers, divergence, with_diagnostics, write_grad, (student, teacher), config
                in itertools.product(arches, teacher_counts, divergences, diagnostics, grads, dtype_sets,
                                     configs)]

    both, off, on, every = (False, True), (False,), (True,), tuple(DIVERGENCES)
    return (product("rows", (2,), every, both, both, DTYPE_SETS)
            + product("rows", (1,), every, both, both, ONE_TEACHER_DTYPE_SETS)
            + product("normalizers", (2, 1), ("reverse_kl",), off, off, STAGE_DTYPE_SETS)
            + product("target_sums", (2, 1), every, both, off, STAGE_DTYPE_SETS)
            + product("mixture_sums", (2, 1), ("jsd",), off, off, STAGE_DTYPE_SETS)
            + product("gradient", (2, 1), every, off, on, STAGE_DTYPE_SETS))


def _signature(kernel, spec: Specialization) -> dict[str, str]:
    types = {"student_ptr": f"*{spec.student_dtype}", "partial_ptr": f"*{spec.teacher_dtype}",
             "full_ptr": f"*{spec.teacher_dtype}", "grad_ptr": f"*{spec.student_dtype}", **_POINTER_TYPES}
    types = {name: types[name] for name in kernel.arg_names if name in types}
    for name in kernel.arg_names:
        if name in types:
            continue
        if name in _FLOAT_SCALARS:
            types[name] = "fp32"
        elif name.isupper():
            types[name] = "constexpr"
        else:  # sizes and row strides; batch strides may pass 2^31 when N·V does
            types[name] = "i64" if name.endswith("stride_b") else "i32"
    return {name: types[name] for name in kernel.arg_names}


def _divisible_by_16(kernel) -> dict[tuple[int], list[list]]:
    aligned = [i for i, name in enumerate(kernel.arg_names)
               if name.endswith("_ptr") or "stride" in name or name == "vocab"]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def _ptxas_numbers(log: str) -> tuple[int, int]:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas log:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_one(spec: Specialization) -> Report:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .launch import LaunchConfig

    kernel = spec.kernel_function()
    source = ASTSource(fn=kernel, signature=_signature(kernel, spec), attrs=_divisible_by_16(kernel),
                       constexprs=spec.constexprs())
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its own ptxas run
            knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
            compiled = triton.compile(source, target=GPUTarget("cuda", spec.arch, 32),
                                      options=LaunchConfig(spec.block_v, spec.num_warps).compile_options())
        registers, spill_bytes = _ptxas_numbers(log.getvalue())
        return Report(spec, registers, spill_bytes, compiled.metadata.shared, None)
    except Exception as error:  # reported per specialization, and the exit code says it failed
        return Report(spec, None, None, None, f"{type(error).__name__}: {error}".splitlines()[0])


def _print_table(reports: list[Report]) -> None:
    header = f"{'kernel':<30} {'arch':<6} {'specialization':<63} {'registers':>9} {'spill B':>8} {'shared B':>9}"
    print(header)
    print("-" * len(header))
    for report in reports:
        spec = report.specialization
        row = f"{KERNELS[spec.kernel]:<30} sm_{spec.arch:<3} {spec.describe():<63}"
        if report.error is not None:
            print(f"{row} ERROR {report.error}")
            continue
        print(f"{row} {report.registers:>9} {report.spill_bytes:>8} {report.shared_bytes:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", required=True,
                        help="compute capability times ten, e.g. 80 (A100) or 90 (H100); repeat for several")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    parser.add_argument("--widest-block-only", action="store_true",
                        help="only the launch configuration of every vocabulary of 2048 tokens or more (real "
                             "vocabularies); the narrower blocks serve V < 2048 (a quarter of the compiles)")
    args = parser.parse_args(argv)
    if _triton_interpreter_enabled():
        parser.error("TRITON_INTERPRET=1 makes the kernels interpreted functions, which do not compile; unset it.")
    specs = specializations(args.arch, args.widest_block_only)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        reports = list(pool.map(compile_one, specs))
    _print_table(reports)
    errors = sum(report.error is not None for report in reports)
    spilling = sum(bool(report.spill_bytes) for report in reports)
    worst = max((report.registers for report in reports if report.registers is not None), default=0)
    print(f"\n{len(reports)} specializations, {errors} compile errors, {spilling} with spills, "
          f"at most {worst} registers per thread")
    return 1 if errors or spilling else 0


if __name__ == "__main__":
    sys.exit(main())
