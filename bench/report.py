"""From measured times and peaks to metrics, the stdout table, results.csv and the plots."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.measure import Outcome
from bench.shapes import Shape

METRICS = ("time_ms", "peak_memory_mib", "bandwidth_gbps", "floor_fraction", "speedup_vs_eager")
COLUMNS = ("provider", "model", "n_tokens", "vocab", "dtype", "teachers", "mode", "metric", "median", "p20", "p80",
           "status", "detail", "device", "copy_bandwidth_gbps", "torch_version", "triton_version",
           "commit", "timestamp")
MIB = 2**20


@dataclass(frozen=True)
class Measurement:
    provider: str
    shape: Shape
    mode: str
    outcome: Outcome


def bytes_moved(shape: Shape, dtype: torch.dtype, mode: str, inputs: int = 3) -> int:
    """The data-movement floor: read the ``inputs`` logits (student, partial and full; student and
    teacher for one teacher) once; for backward, write the gradient.

    All inputs share ``dtype`` here and the gradient has the student's dtype: 8 bytes per element for
    bfloat16 forward+backward with three inputs, 6 with two; 6 and 4 for the forward alone.
    """
    size = torch.empty((), dtype=dtype).element_size()
    per_element = inputs * size + (size if mode == "forward+backward" else 0)
    return shape.n_tokens * shape.vocab * per_element


def _quantiles(values) -> tuple[float, float, float]:
    median, p20, p80 = np.percentile(values, [50, 20, 80])
    return float(median), float(p20), float(p80)


def _row(m: Measurement, dtype: str, metric: str, median=None, p20=None, p80=None) -> dict:
    return {"provider": m.provider, "model": m.shape.model, "n_tokens": m.shape.n_tokens, "vocab": m.shape.vocab,
            "dtype": dtype, "mode": m.mode, "metric": metric, "median": median, "p20": p20, "p80": p80,
            "status": m.outcome.status, "detail": m.outcome.detail}


def metric_rows(measurements: list[Measurement], dtype: str, copy_bytes_per_s: float, inputs: int = 3) -> list[dict]:
    """One row per measurement × metric; failed or unavailable measurements keep their rows, values empty.

    Bandwidth and floor fraction are monotone in time, so their p20 comes from the time's p80.
    """
    eager_median = {(m.shape, m.mode): _quantiles(m.outcome.times_s)[0] for m in measurements
                    if m.provider == "eager" and m.outcome.status == "ok"}
    rows = []
    for m in measurements:
        if m.outcome.status != "ok":
            rows += [_row(m, dtype, metric) for metric in METRICS]
            continue
        median, p20, p80 = _quantiles(m.outcome.times_s)
        moved = bytes_moved(m.shape, getattr(torch, dtype), m.mode, inputs)
        floor_s = moved / copy_bytes_per_s
        rows.append(_row(m, dtype, "time_ms", median * 1e3, p20 * 1e3, p80 * 1e3))
        rows.append(_row(m, dtype, "peak_memory_mib", m.outcome.peak_bytes / MIB))
        rows.append(_row(m, dtype, "bandwidth_gbps", moved / median / 1e9, moved / p80 / 1e9, moved / p20 / 1e9))
        rows.append(_row(m, dtype, "floor_fraction", floor_s / median, floor_s / p80, floor_s / p20))
        baseline = eager_median.get((m.shape, m.mode))
        rows.append(_row(m, dtype, "speedup_vs_eager", baseline / median if baseline else None))
    return rows


def write_csv(path: Path, rows: list[dict], metadata: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **metadata})


def _format(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], modes: tuple[str, ...]) -> str:
    """The stdout table: one line per shape × provider, failures numbered with their reason below."""
    by_key = {(r["mode"], r["model"], r["n_tokens"], r["provider"], r["metric"]): r for r in rows}
    width = max([len("provider")] + [len(r["provider"]) for r in rows])
    header = (f"{'model':<12} {'N':>6} {'V':>7} {'provider':<{width}} {'median ms':>10} {'p20-p80 ms':>19} "
              f"{'peak MiB':>9} {'GB/s':>7} {'floor':>6} {'vs eager':>8}")
    reasons: list[str] = []
    lines = []
    for mode in modes:
        lines += ["", f"== {mode} ==", header]
        seen = dict.fromkeys((r["model"], r["n_tokens"], r["vocab"], r["provider"]) for r in rows if r["mode"] == mode)
        for model, n_tokens, vocab, provider in seen:
            cell = {metric: by_key[(mode, model, n_tokens, provider, metric)] for metric in METRICS}
            prefix = f"{model:<12} {n_tokens:>6} {vocab:>7} {provider:<{width}}"
            status = cell["time_ms"]["status"]
            if status != "ok":
                reason = f"{status}: {cell['time_ms']['detail']}"
                if reason not in reasons:
                    reasons.append(reason)
                lines.append(f"{prefix} {status} [{reasons.index(reason) + 1}]")
                continue
            time_ms, floor, speedup = cell["time_ms"], cell["floor_fraction"]["median"], cell["speedup_vs_eager"]
            spread = f"{time_ms['p20']:.2f}-{time_ms['p80']:.2f}"
            lines.append(f"{prefix} {time_ms['median']:>10.2f} {spread:>19} "
                         f"{cell['peak_memory_mib']['median']:>9.1f} {cell['bandwidth_gbps']['median']:>7.2f} "
                         f"{floor * 100:>5.1f}% {_format(speedup['median'], '>7.2f')}x")
    if reasons:
        lines += [""] + [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines)


def plot(rows: list[dict], modes: tuple[str, ...], out_dir: Path) -> list[Path]:
    """time.png and memory.png: the metric against tokens, one line per provider, a panel per model × mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    models = list(dict.fromkeys(r["model"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    written = []
    for metric, label, filename in (("time_ms", "time (ms, median; bars p20-p80)", "time.png"),
                                    ("peak_memory_mib", "peak memory above inputs (MiB)", "memory.png")):
        figure, axes = plt.subplots(len(modes), len(models), figsize=(4.2 * len(models), 3.4 * len(modes)),
                                    squeeze=False)
        for row_axes, mode in zip(axes, modes, strict=True):
            for ax, model in zip(row_axes, models, strict=True):
                all_positive = True  # a log axis only when every plotted value can sit on it
                for provider in providers:
                    points = sorted((r["n_tokens"], r["median"], r["p20"], r["p80"]) for r in rows
                                    if r["status"] == "ok" and r["metric"] == metric
                                    and (r["mode"], r["model"], r["provider"]) == (mode, model, provider))
                    if not points:
                        continue
                    n, median, p20, p80 = (np.array(column, dtype=float) for column in zip(*points, strict=True))
                    all_positive &= bool((median > 0).all())
                    errors = None if metric != "time_ms" else [median - p20, p80 - median]
                    ax.errorbar(n, median, yerr=errors, marker="o", capsize=3, label=provider)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log" if all_positive else "linear")
                ax.set(xlabel="tokens N", ylabel=label, title=f"{model}, {mode}")
                token_counts = sorted({r["n_tokens"] for r in rows if r["model"] == model})
                ax.set_xticks(token_counts, [str(n) for n in token_counts])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.grid(True, alpha=0.3)
                if ax.has_data():
                    ax.legend(fontsize="small")
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
