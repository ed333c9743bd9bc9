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


HEADER = ("model", "N", "V", "provider", "median ms", "p20-p80 ms", "peak MiB", "GB/s", "floor", "vs eager")
_RIGHT_ALIGNED = (False, True, True, False, True, True, True, True, True, True)


def _format(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_lines(rows: list[dict], mode: str, reasons: list[str]) -> list[tuple[str, ...]]:
    """One tuple of HEADER's cells per shape × provider of ``mode``. A failure has five cells, the last
    naming its status and a footnote number into ``reasons``, which this extends with each new reason."""
    by_key = {(r["mode"], r["model"], r["n_tokens"], r["provider"], r["metric"]): r for r in rows}
    seen = dict.fromkeys((r["model"], r["n_tokens"], r["vocab"], r["provider"]) for r in rows if r["mode"] == mode)
    lines = []
    for model, n_tokens, vocab, provider in seen:
        cell = {metric: by_key[(mode, model, n_tokens, provider, metric)] for metric in METRICS}
        shape = (model, str(n_tokens), str(vocab), provider)
        status = cell["time_ms"]["status"]
        if status != "ok":
            reason = f"{status}: {cell['time_ms']['detail']}"
            if reason not in reasons:
                reasons.append(reason)
            lines.append(shape + (f"{status} [{reasons.index(reason) + 1}]",))
            continue
        time_ms, floor, speedup = cell["time_ms"], cell["floor_fraction"]["median"], cell["speedup_vs_eager"]
        lines.append(shape + (f"{time_ms['median']:.2f}", f"{time_ms['p20']:.2f}-{time_ms['p80']:.2f}",
                              f"{cell['peak_memory_mib']['median']:.1f}", f"{cell['bandwidth_gbps']['median']:.2f}",
                              f"{floor * 100:.1f}%", _format(speedup["median"], ".2f") + "x"))
    return lines


def _dtype(rows: list[dict]) -> str:
    return rows[0]["dtype"] if rows else "?"


def table(rows: list[dict], modes: tuple[str, ...]) -> str:
    """The stdout table: a block per mode, one line per shape × provider, failures numbered with their
    reason below."""
    reasons: list[str] = []
    blocks = {mode: _table_lines(rows, mode, reasons) for mode in modes}
    # column widths from the header and every measured cell; a failure's status does not widen its column
    sized = [line if len(line) == len(HEADER) else line[:4] for lines in blocks.values() for line in lines]
    widths = [max([len(name)] + [len(line[i]) for line in sized if i < len(line)]) for i, name in enumerate(HEADER)]

    def render(cells) -> str:  # a failure's status runs on after the shape's four cells
        aligned = [cell.rjust(w) if right else cell.ljust(w)
                   for cell, w, right in zip(cells[:4], widths, _RIGHT_ALIGNED)]
        return " ".join(aligned + ([cells[4]] if len(cells) < len(HEADER) else
                                   [cell.rjust(w) for cell, w in zip(cells[4:], widths[4:])]))

    out = []
    for mode, lines in blocks.items():
        out += ["", f"== {mode}, {_dtype(rows)} logits ==", render(HEADER)]
        out += [render(line) for line in lines]
    if reasons:
        out += [""] + [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(out)


def markdown(rows: list[dict], modes: tuple[str, ...], metadata: dict, command: str) -> str:
    """results.md: the same tables in Markdown, headed by the run's device, date, command and versions."""
    reasons: list[str] = []
    out = [f"- device: {metadata['device']}; copy bandwidth {metadata['copy_bandwidth_gbps']} GB/s",
           f"- date: {metadata['timestamp']} (UTC, end of the run)",
           f"- command: `{command}`",
           f"- torch {metadata['torch_version']}, triton {metadata['triton_version']}, commit {metadata['commit']}"]
    for mode in modes:
        out += ["", f"{mode}, {_dtype(rows)} logits", "",
                "| " + " | ".join(HEADER) + " |",
                "|" + "|".join("---:" if right else "---" for right in _RIGHT_ALIGNED) + "|"]
        out += ["| " + " | ".join(line + ("",) * (len(HEADER) - len(line))) + " |"
                for line in _table_lines(rows, mode, reasons)]
    if reasons:
        out += [""] + [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(out) + "\n"


def _log_axis(ax, axis: str, values: np.ndarray) -> None:
    """A log axis labelled at 1-2-5 steps when it spans less than two decades, at powers of ten
    otherwise; minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    span = np.log10(values.max() / values.min()) if values.size else 0.0
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 2 else (1.0,)))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def plot(rows: list[dict], modes: tuple[str, ...], out_dir: Path, device: str) -> list[Path]:
    """time.png and memory.png: the metric against tokens, one line per provider, a panel per model
    (columns) × mode (rows), one title (device, dtype, modes) and one legend per figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    models = list(dict.fromkeys(r["model"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {provider: f"C{i}" for i, provider in enumerate(providers)}  # one color per provider in every panel
    written = []
    for metric, label, what, filename in (
            ("time_ms", "time (ms), bars p20-p80", "time per call", "time.png"),
            ("peak_memory_mib", "peak memory above inputs (MiB)", "peak memory", "memory.png")):
        figure, axes = plt.subplots(len(modes), len(models), figsize=(4.6 * len(models), 3.3 * len(modes) + 1.0),
                                    squeeze=False)
        handles = {}
        for row_axes, mode in zip(axes, modes, strict=True):
            for ax, model in zip(row_axes, models, strict=True):
                plotted = []
                for provider in providers:
                    points = sorted((r["n_tokens"], r["median"], r["p20"], r["p80"]) for r in rows
                                    if r["status"] == "ok" and r["metric"] == metric
                                    and (r["mode"], r["model"], r["provider"]) == (mode, model, provider))
                    if not points:
                        continue
                    n, median, p20, p80 = (np.array(column, dtype=float) for column in zip(*points, strict=True))
                    plotted.append(median)
                    errors = None if metric != "time_ms" else [median - p20, p80 - median]
                    handles[provider] = ax.errorbar(n, median, yerr=errors, marker="o", capsize=3,
                                                    color=colors[provider], label=provider)
                values = np.concatenate(plotted) if plotted else np.array([])
                ax.set_xscale("log", base=2)
                if values.size and (values > 0).all():  # a log axis only when every value can sit on it
                    ax.set_yscale("log")
                    _log_axis(ax, "y", values)
                vocab = next(r["vocab"] for r in rows if r["model"] == model)
                ax.set(xlabel="tokens N", ylabel=label)
                ax.set_title(f"{model} (V = {vocab:,}), {mode}", fontsize="medium")
                token_counts = sorted({r["n_tokens"] for r in rows if r["model"] == model})
                ax.set_xticks(token_counts, [str(n) for n in token_counts])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.grid(True, alpha=0.3)
        figure.suptitle(f"{what}: {device}, {_dtype(rows)} logits, {' and '.join(modes)}")
        if handles:
            figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7),
                          frameon=False)
        figure.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
        path = out_dir / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
