"""The native CPU kernel alone, per instruction-set copy: forward and gradient of N rows into a
gradient buffer allocated and touched once, so that page faults and allocation stay out of the
figure (docs/native.md). bench/native_goal.py measures the whole call, fresh gradient included.

Usage: python bench/native_kernel.py [--dtype bfloat16|float16|float32] [--isa NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aropd_kernels import native

N, V = 256, 151936


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the three logits and of the gradient (default: bfloat16)")
    parser.add_argument("--isa", nargs="*", help="instruction-set copies to time (default: every one this CPU runs)")
    parser.add_argument("--repeats", type=int, default=12, help="timed calls per copy, after 3 warm-up calls")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"the native kernel is not built: {native.unavailable_reason()}")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(1, N, V, generator=generator) * 2).to(dtype)
    partial = torch.randn(1, N, V, generator=generator) * 2
    full = (partial + torch.randn(1, N, V, generator=generator)).to(dtype)
    partial = partial.to(dtype)
    grad = torch.zeros_like(student)
    temperature, active, scale = torch.ones(N), torch.ones(N, dtype=torch.bool), torch.ones(N)
    print(f"N = {N}, V = {V}, {args.dtype}, reverse KL, {torch.get_num_threads()} threads")
    for isa in args.isa or native.instruction_sets():
        native._select_instruction_set(isa)
        times = []
        for _ in range(3 + args.repeats):
            start = time.perf_counter()
            native.compute_rows(student, partial, full, temperature, active, scale, grad,
                                lam=1.0, clip=5.0, beta=1.0, with_diagnostics=False)
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{isa:10} median {statistics.median(times[3:]):6.1f} ms   min {min(times[3:]):6.1f} ms")
    native._select_instruction_set(native.instruction_sets()[0])


if __name__ == "__main__":
    main()
