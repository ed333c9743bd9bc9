"""Benchmark of the AR-OPD loss: how much time and memory aropd-kernels saves on real vocabularies.

Every provider (a way to compute the loss and the student gradient) runs on every shape (a model's
vocabulary V × a token count N) in each mode, each (provider, shape) in a fresh process. Prints a
table, and writes results.csv, results.md (the table in Markdown, with device, date and command),
time.png and memory.png to --out. docs/benchmarks.md explains them.
--teachers 1 measures the one-teacher loss, distillation_divergence, instead (bench/one_teacher.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `python bench/run.py` puts bench/ on the path, not the repository

import torch  # noqa: E402

from bench import measure, report, shapes  # noqa: E402
from bench.one_teacher import ONE_TEACHER_PROVIDERS, PROVIDERS_BY_TEACHERS  # noqa: E402
from bench.providers import DEFAULT_PROVIDERS, PROVIDERS, LossSettings  # noqa: E402

DTYPES = ("bfloat16", "float16", "float32")
DEFAULTS = {  # device type -> (models, tokens, timing plan); --quick swaps in shapes.QUICK_* shapes
    "cuda": (shapes.SWEEP_MODELS, shapes.CUDA_TOKENS, measure.TimingPlan(warmup=3, repeats=20, budget_s=10.0)),
    "cpu": (shapes.SWEEP_MODELS, shapes.CPU_TOKENS, measure.TimingPlan(warmup=1, repeats=5, budget_s=3.0)),
}


def _defaults_help() -> str:
    _, cuda_tokens, cuda_plan = DEFAULTS["cuda"]
    _, cpu_tokens, cpu_plan = DEFAULTS["cpu"]
    lines = [
        "defaults by device:",
        f"  cuda     {', '.join(shapes.SWEEP_MODELS)} × N in {list(cuda_tokens)}; {cuda_plan.warmup} warm-up and "
        f"{cuda_plan.repeats} timed calls",
        f"  cpu      the same models × N in {list(cpu_tokens)} (5-7 minutes on 2 busy cores); {cpu_plan.warmup} warm-up,",
        f"           then up to {cpu_plan.repeats} timed calls or {cpu_plan.budget_s:.0f} s "
        f"(at least {measure.MIN_REPEATS})",
        f"  --quick  {', '.join(shapes.QUICK_MODELS)} × N in {list(shapes.QUICK_TOKENS)}, timed as above "
        "(CPU: under 3 minutes on 2 cores)",
        "models: " + ", ".join(f"{name} (V={vocab}" + (f", H={shapes.MODEL_HIDDEN[name]})" if name in shapes.MODEL_HIDDEN
                                                       else ")") for name, vocab in shapes.MODEL_VOCAB.items()),
        "providers:",
        *(f"  {name:<16}{provider.description}" for name, provider in PROVIDERS.items()),
        "providers with --teachers 1:",
        *(f"  {name:<16}{provider.description}" for name, provider in ONE_TEACHER_PROVIDERS.items()),
        "The loss: the public API's defaults, reverse KL (--beta 1), lam=1, clip=5, temperature=1, batch mean;",
        "with --teachers 1, distillation_divergence: the same divergence to softmax(teacher / T).",
        "Memory is the peak above the inputs (the gradient included, unless it overwrites the logits).",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=_defaults_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto: cuda when available, else cpu (default: auto)")
    every_provider = tuple(dict.fromkeys([*PROVIDERS, *ONE_TEACHER_PROVIDERS]))
    parser.add_argument("--providers", nargs="+", choices=every_provider, metavar="NAME",
                        help=f"providers to compare, from {', '.join(PROVIDERS)}; with --teachers 1 from "
                             f"{', '.join(ONE_TEACHER_PROVIDERS)} (default: all but those marked 'on request' "
                             "below; unavailable ones are reported as such)")
    parser.add_argument("--teachers", type=int, choices=(1, 2), default=2,
                        help="2: the anchored loss, student and two teacher views (default); 1: one teacher, "
                             "distillation_divergence (OPD, GKD, self-distillation)")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="models from the registry below, case-insensitive (default: by device, see below; "
                             "none when --vocab is given)")
    parser.add_argument("--vocab", nargs="+", type=int, default=[], metavar="V",
                        help="extra vocabulary sizes outside the registry, named vocab-V (e.g. for a smoke test)")
    parser.add_argument("--hidden", type=int, metavar="H",
                        help="hidden size of the lm_head for the providers that start from hidden states (default: "
                             "the model's, where the registry knows it; needed with --vocab)")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="N",
                        help="token counts N (rows of the logits) to sweep (default: by device, see below)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the logits tensors and the gradient (default: bfloat16)")
    parser.add_argument("--mode", choices=("forward", "forward+backward", "all"), default="all",
                        help="forward: the loss only, under no_grad; forward+backward: the loss and the student "
                             "gradient; all: both (default)")
    parser.add_argument("--quick", action="store_true", help="the CPU-sized subset below, for a first look")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="folder for results.csv, results.md, time.png and memory.png (default: bench/results/)")
    parser.add_argument("--beta", type=float, default=1.0,
                        help="divergence: 1 reverse KL (default), 0 forward KL (the AR-OPD paper's scripts), "
                             "in between generalized JSD")
    parser.add_argument("--chunk-rows", type=int, default=None, metavar="ROWS",
                        help="rows per block for the chunked provider (default: the largest power of two with at most "
                             "2^24 elements per block: 64 rows for V=152064)")
    parser.add_argument("--native-isa", metavar="NAME",
                        help="the native kernel's instruction-set copy for the native providers, e.g. x86-64-v3 "
                             "(default: the best this CPU runs; aropd_kernels.native.instruction_sets() lists them)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default: by device, see below)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up on one (provider, shape) after this long and report a timeout (default: 900)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    args = parser.parse_args(argv)
    for name in ("tokens", "vocab"):
        if any(value < 1 for value in getattr(args, name) or []):
            parser.error(f"--{name} values must be >= 1")
    if args.hidden is not None and args.hidden < 1:
        parser.error("--hidden must be >= 1")
    if not 0 <= args.beta <= 1:
        parser.error("--beta must be in [0, 1]")
    registry = PROVIDERS_BY_TEACHERS[args.teachers]
    if args.providers is None:
        args.providers = DEFAULT_PROVIDERS if args.teachers == 2 else list(registry)
    unknown = [name for name in args.providers if name not in registry]
    if unknown:
        parser.error(f"--providers {' '.join(unknown)}: not a provider with --teachers {args.teachers}; "
                     f"choose from {', '.join(registry)}")
    if args.native_isa is not None:
        _check_native_isa(parser, args.native_isa)
    return args


def _check_native_isa(parser: argparse.ArgumentParser, name: str) -> None:
    from aropd_kernels import native

    if not native.available():
        parser.error(f"--native-isa: the native kernel is not built ({native.unavailable_reason()})")
    if name not in native.instruction_sets():
        parser.error(f"--native-isa: this CPU runs {', '.join(native.instruction_sets())}, not {name!r}")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu.")
    return torch.device(requested)


def plan_sweep(args, device: torch.device):
    models, tokens, plan = DEFAULTS[device.type]
    if args.quick:
        models, tokens = shapes.QUICK_MODELS, shapes.QUICK_TOKENS
    if args.vocab and not args.models:
        models = ()
    models = args.models if args.models is not None else models
    if args.repeats is not None:
        plan = measure.TimingPlan(plan.warmup, args.repeats, plan.budget_s)
    try:
        sweep = shapes.sweep(list(models), args.vocab, args.tokens or list(tokens), args.hidden)
    except ValueError as error:
        sys.exit(f"--models: {error}")
    return sweep, plan


def run_metadata(device_description: str, copy_bytes_per_s: float, teachers: int) -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"teachers": teachers, "device": device_description,
            "copy_bandwidth_gbps": round(copy_bytes_per_s / 1e9, 3),
            "torch_version": torch.__version__, "triton_version": triton_version, "commit": commit,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        print("(pip install tqdm for a progress bar)", file=sys.stderr)
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)


def run_sweep(args, device, sweep, plan, modes) -> list[report.Measurement]:
    settings = LossSettings(beta=args.beta, chunk_rows=args.chunk_rows, teachers=args.teachers,
                            native_isa=args.native_isa)
    registry = PROVIDERS_BY_TEACHERS[args.teachers]
    bar = progress(len(sweep) * len(args.providers), not args.no_progress)
    measurements = []
    for shape in sweep:
        for provider in args.providers:
            if bar is not None:
                bar.set_description(f"{provider} {shape.model} N={shape.n_tokens}")
            reason = registry[provider].why_unavailable(device, getattr(torch, args.dtype))
            if reason is None:
                job = measure.Job(provider, shape, args.dtype, str(device), modes, settings, plan)
                outcomes = measure.measure(job, args.timeout)
            else:
                outcomes = {mode: measure.Outcome("unavailable", detail=reason) for mode in modes}
            measurements += [report.Measurement(provider, shape, mode, outcomes[mode]) for mode in modes]
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return measurements


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    sweep, plan = plan_sweep(args, device)
    modes = measure.MODES if args.mode == "all" else (args.mode,)
    args.out.mkdir(parents=True, exist_ok=True)

    description, copy_bytes_per_s = measure.probe_device(str(device), args.timeout)
    print(f"device: {description}; copy bandwidth {copy_bytes_per_s / 1e9:.1f} GB/s (read + write of a large "
          f"tensor copy, the speed of light used for 'floor')", flush=True)
    measurements = run_sweep(args, device, sweep, plan, modes)

    rows = report.metric_rows(measurements, args.dtype, copy_bytes_per_s, inputs=1 + args.teachers)
    print(report.table(rows, modes))
    metadata = run_metadata(description, copy_bytes_per_s, args.teachers)
    csv_path, markdown_path = args.out / "results.csv", args.out / "results.md"
    report.write_csv(csv_path, rows, metadata)
    command = shlex.join(["python", "bench/run.py", *argv])
    markdown_path.write_text(report.markdown(rows, modes, metadata, command), encoding="utf-8")
    written = [csv_path, markdown_path]
    try:
        written += report.plot(rows, modes, args.out, description)
    except ImportError:
        print("no plots: pip install matplotlib (or '.[bench]')", file=sys.stderr)
    print("\nwrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
