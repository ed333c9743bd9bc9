"""The benchmark CLI (bench/run.py): its baselines compute the loss, and a tiny sweep writes its outputs.

The smoke runs the real CLI in a subprocess on a tiny vocabulary, so it also covers the child
processes, the CSV and the plots; it asserts no timings (the machine is shared).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench/ is not an installed package

from aropd_kernels import anchored_residual_kl, backends  # noqa: E402
from bench import measure, report  # noqa: E402
from bench import shapes  # noqa: E402
from bench.providers import (  # noqa: E402
    DEFAULT_PROVIDERS, PROVIDERS, LossSettings, Unavailable, eager_loss, linear_package_provider, logits_inputs,
    make_chunked, model_output, package_provider,
)
from bench.shapes import Shape  # noqa: E402


def _logits(n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(n_tokens, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_eager_baseline_matches_the_float64_reference(beta):
    student, partial, full = (_logits(7, 301, seed) for seed in range(3))
    settings = LossSettings(lam=0.7, clip=1.5, beta=beta, temperature=1.3)
    student64 = student.double().requires_grad_()
    expected = anchored_residual_kl(student64, partial.double(), full.double(), lam=0.7, clip=1.5, beta=beta,
                                    temperature=1.3, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, student64)

    student32 = student.clone().requires_grad_()
    loss = eager_loss(student32, partial, full, settings)
    (grad,) = torch.autograd.grad(loss, student32)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def test_chunked_baseline_equals_eager_over_uneven_blocks():
    student, partial, full = (_logits(7, 301, seed) for seed in range(3))
    student.requires_grad_()
    settings = LossSettings(chunk_rows=3)  # blocks of 3, 3 and 1 rows
    eager_value, eager_grad = PROVIDERS["eager"].make(settings)(student, partial, full, True)
    chunked_value, chunked_grad = make_chunked(settings)(student, partial, full, True)
    (forward_only,) = make_chunked(settings)(student, partial, full, False)
    torch.testing.assert_close(chunked_value, eager_value)
    torch.testing.assert_close(forward_only, eager_value)
    torch.testing.assert_close(chunked_grad, eager_grad)


def test_bytes_moved_is_the_8_bytes_per_element_floor_for_bfloat16():
    shape = Shape("m", n_tokens=3, vocab=5)
    assert report.bytes_moved(shape, torch.bfloat16, "forward+backward") == 15 * 8
    assert report.bytes_moved(shape, torch.bfloat16, "forward") == 15 * 6
    assert report.bytes_moved(shape, torch.float32, "forward+backward") == 15 * 16


def test_metric_rows_order_quantiles_and_keep_failures():
    shape = Shape("m", 4, 1000)
    measurements = [
        report.Measurement("eager", shape, "forward", measure.Outcome("ok", [0.004, 0.002, 0.003], 1000)),
        report.Measurement("compiled", shape, "forward", measure.Outcome("ok", [0.001, 0.002, 0.0015], 10)),
        report.Measurement("native", shape, "forward", measure.Outcome("unavailable", detail="not built")),
    ]
    rows = {(r["provider"], r["metric"]): r for r in report.metric_rows(measurements, "bfloat16", 1e9)}
    for metric in ("time_ms", "bandwidth_gbps", "floor_fraction"):
        row = rows[("compiled", metric)]
        assert row["p20"] <= row["median"] <= row["p80"], metric
    assert rows[("compiled", "speedup_vs_eager")]["median"] == pytest.approx(0.003 / 0.0015)
    assert rows[("compiled", "floor_fraction")]["median"] == pytest.approx(4 * 1000 * 6 / 1e9 / 0.0015)
    assert all(rows[("native", m)]["status"] == "unavailable" and rows[("native", m)]["median"] is None
               for m in report.METRICS)
    printed = report.table(report.metric_rows(measurements, "bfloat16", 1e9), ("forward",))
    assert "== forward, bfloat16 logits ==" in printed and "[1] unavailable: not built" in printed


def test_package_providers_are_thin_calls_of_the_public_api():
    make, why_unavailable = package_provider("reference")  # the path that triton and native take
    assert why_unavailable(torch.device("cpu"), torch.bfloat16) is None
    student, partial, full = (_logits(5, 77, seed) for seed in range(3))
    student.requires_grad_()
    settings = LossSettings(beta=0.0, clip=2.0)
    loss, grad = make(settings)(student, partial, full, True)
    eager_value, eager_grad = PROVIDERS["eager"].make(settings)(student, partial, full, True)
    (forward_only,) = make(settings)(student, partial, full, False)
    torch.testing.assert_close(loss, eager_value)
    torch.testing.assert_close(forward_only, eager_value)
    torch.testing.assert_close(grad, eager_grad)


def test_inplace_providers_return_the_gradient_in_the_logits_they_were_handed():
    make, _ = package_provider("reference", inplace_grad=True)
    student, partial, full = (_logits(5, 77, seed) for seed in range(3))
    student.requires_grad_()
    settings = LossSettings(clip=2.0)
    logits = model_output(student)
    loss, grad = make(settings)(logits, partial, full, True)
    eager_value, eager_grad = PROVIDERS["eager"].make(settings)(student, partial, full, True)
    assert grad.data_ptr() == logits.data_ptr() and not logits.is_leaf
    torch.testing.assert_close(loss, eager_value)
    torch.testing.assert_close(grad, eager_grad)
    assert PROVIDERS["native-inplace"].student_input is model_output
    assert PROVIDERS["native"].student_input(student) is student


def _growth_of_calls_on_prepared_inputs(connection, n_floats):
    source = torch.ones(n_floats)

    def prepare():
        return (source * 1,)

    in_place = measure._cpu_peak_growth(lambda x: x.mul_(2), prepare)
    allocating = measure._cpu_peak_growth(lambda x: x * 2, prepare)
    connection.send((in_place, allocating))


def test_cpu_peak_growth_counts_prepared_arguments_as_inputs():
    n_floats = 4 * 2**20
    result, status, detail = measure._run_in_child(_growth_of_calls_on_prepared_inputs, (n_floats,), timeout_s=120)
    assert status == "ok", detail
    in_place, allocating = result
    assert in_place < 2**20 and abs(allocating - 4 * n_floats) < 2**20


def test_hidden_state_providers_compute_the_same_loss_and_gradients():
    inputs = PROVIDERS["fused-linear"].inputs(Shape("m", n_tokens=5, vocab=77, hidden=16), torch.float32,
                                              torch.device("cpu"))
    settings = LossSettings(beta=0.0, clip=2.0)
    results = {name: PROVIDERS[name].make(settings)(*inputs, True) for name in ("linear+eager", "fused-linear")}
    results["linear+reference"] = linear_package_provider("reference")[0](settings)(*inputs, True)
    assert [len(result) for result in results.values()] == [3] * 3  # loss, hidden and weight gradients
    (forward_only,) = PROVIDERS["fused-linear"].make(settings)(*inputs, False)
    expected = results.pop("linear+eager")
    torch.testing.assert_close(forward_only, expected[0])
    for result in results.values():
        for actual, wanted in zip(result, expected):
            torch.testing.assert_close(actual, wanted)


def test_model_logits_provider_equals_the_matmuls_then_the_package_in_bfloat16():
    """fused-linear-model-logits computes the logits the matmuls in bfloat16 give (one chunk here), so the
    loss of linear+reference to float32 rounding; it is unavailable for float32 inputs, which logits_dtype=
    refuses."""
    inputs = PROVIDERS["fused-linear"].inputs(Shape("m", n_tokens=5, vocab=77, hidden=16), torch.bfloat16,
                                              torch.device("cpu"))
    settings = LossSettings()
    fused = PROVIDERS["fused-linear-model-logits"].make(settings)(*inputs, True)
    unfused = linear_package_provider("reference")[0](settings)(*inputs, True)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    for actual, wanted in zip(fused[1:], unfused[1:]):
        assert actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual.float(), wanted.float(), rtol=0.02, atol=1e-3)
    provider = PROVIDERS["fused-linear-model-logits"]
    assert "--dtype bfloat16" in provider.why_unavailable(torch.device("cpu"), torch.float32)
    assert provider.why_unavailable(torch.device("cpu"), torch.bfloat16) is None


def test_hidden_state_providers_run_where_the_hidden_size_is_known():
    sweep = shapes.sweep(["qwen2.5-0.5b", "Gemma-3"], [1000], [4])
    assert [shape.hidden for shape in sweep] == [896, None, None]
    assert [shape.hidden for shape in shapes.sweep(["Gemma-3"], [1000], [4], hidden=32)] == [32, 32]
    with pytest.raises(Unavailable, match="--hidden"):
        PROVIDERS["linear+eager"].inputs(sweep[1], torch.float32, torch.device("cpu"))
    job = measure.Job("fused-linear", sweep[2], "float32", "cpu", measure.MODES, LossSettings(),
                      measure.TimingPlan(0, 1, 1.0))
    assert {outcome.status for outcome in measure._measure_modes(job).values()} == {"unavailable"}
    assert "fused-linear" not in DEFAULT_PROVIDERS and "native" in DEFAULT_PROVIDERS
def _instruction_set_after_making_the_native_provider(connection, name):
    make, _ = package_provider("native")
    make(LossSettings(native_isa=name))
    from aropd_kernels import native

    connection.send(native.instruction_set())


@pytest.mark.skipif(not backends.native_available(), reason="the native kernel is not built")
def test_native_isa_setting_selects_the_copy_in_the_measuring_process():
    from aropd_kernels import native

    name = native.instruction_sets()[-1]  # the baseline copy, which every CPU runs
    result, status, detail = measure._run_in_child(_instruction_set_after_making_the_native_provider, (name,),
                                                   timeout_s=120)
    assert status == "ok", detail
    assert result == name


def test_cli_refuses_an_unknown_native_instruction_set():
    command = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--native-isa", "no-such-isa"]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "--native-isa" in completed.stderr


def test_gpu_check_without_a_gpu_stops_at_once_and_says_why(tmp_path):
    out = tmp_path / "gpu-check"
    completed = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(out)], check=False,
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert completed.returncode == 3, completed.stdout + completed.stderr
    assert "needs an NVIDIA GPU" in completed.stderr and "Nothing was run" in completed.stderr
    assert not out.exists()


def test_gpu_check_asks_for_its_output_folder():
    completed = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh")], check=False,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "usage: bash bench/gpu_check.sh OUT_FOLDER" in completed.stderr


def test_unavailable_backends_say_why():
    cpu = torch.device("cpu")
    assert "CUDA" in PROVIDERS["triton"].why_unavailable(cpu, torch.bfloat16)
    reason = PROVIDERS["native"].why_unavailable(cpu, torch.bfloat16)
    assert (reason is None) == backends.native_available() and reason != ""


def test_a_failed_allocation_is_reported_as_out_of_memory():
    with pytest.raises(RuntimeError) as failure:
        torch.empty(2**62, dtype=torch.uint8)
    assert measure._failure(failure.value).status == "out of memory"
    assert measure._failure(ValueError("bad shape")) == measure.Outcome("error", detail="ValueError: bad shape")


def _growth_of_a_reallocated_buffer(connection, n_floats):
    for _ in range(2):  # by default glibc serves the second from its heap and keeps it resident once freed
        torch.ones(n_floats)
    connection.send(measure._cpu_peak_growth(lambda: torch.ones(n_floats)))


def test_cpu_peak_growth_sees_a_buffer_that_reuses_freed_memory():
    n_floats = 4 * 2**20  # 16 MiB, under glibc's 32 MiB ceiling for its adaptive mmap threshold
    growth, status, detail = measure._run_in_child(_growth_of_a_reallocated_buffer, (n_floats,), timeout_s=120)
    assert status == "ok", detail
    assert abs(growth - 4 * n_floats) < 2**20


def _exit_without_result(connection, code):
    os._exit(code)


def _hang(connection):
    time.sleep(60)


def test_a_child_that_dies_or_hangs_is_reported_not_raised():
    result, status, detail = measure._run_in_child(_exit_without_result, (3,), timeout_s=60)
    assert (result, status) == (None, "crashed") and "code 3" in detail
    result, status, _ = measure._run_in_child(_hang, (), timeout_s=1)
    assert (result, status) == (None, "timeout")


def test_cli_smoke_writes_csv_and_plots_and_reports_unavailable_providers(tmp_path):
    providers = ["eager", "chunked", "native", "native-inplace", "triton"]
    command = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--device", "cpu", "--vocab", "1000",
               "--tokens", "4", "--providers", *providers, "--repeats", "2", "--no-progress", "--dtype", "float32",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)  # a hang guard
    assert completed.returncode == 0, completed.stderr

    with open(tmp_path / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == report.COLUMNS
        rows = list(reader)
    assert len(rows) == len(providers) * len(measure.MODES) * len(report.METRICS)
    by_key = {(r["provider"], r["n_tokens"], r["mode"], r["metric"]): r for r in rows}
    for mode in measure.MODES:
        for provider in ("eager", "chunked"):
            time_ms = by_key[(provider, "4", mode, "time_ms")]
            assert time_ms["status"] == "ok", time_ms["detail"]
            assert 0 < float(time_ms["p20"]) <= float(time_ms["median"]) <= float(time_ms["p80"])
            assert float(by_key[(provider, "4", mode, "peak_memory_mib")]["median"]) >= 0
        assert float(by_key[("eager", "4", mode, "speedup_vs_eager")]["median"]) == 1.0
        triton = by_key[("triton", "4", mode, "time_ms")]
        assert triton["status"] == "unavailable" and triton["detail"] and not triton["median"]
        for provider in ("native", "native-inplace"):
            native = by_key[(provider, "4", mode, "time_ms")]
            assert native["status"] == ("ok" if backends.native_available() else "unavailable"), native["detail"]
    assert {r["device"] for r in rows} != {""} and {r["torch_version"] for r in rows} == {torch.__version__}
    assert "unavailable [" in completed.stdout and "== forward+backward, float32 logits ==" in completed.stdout
    markdown = (tmp_path / "results.md").read_text()
    assert f"- command: `python bench/run.py {' '.join(command[2:])}`" in markdown
    assert "- device: cpu" in markdown and "- date: " in markdown
    assert "forward+backward, float32 logits" in markdown and "| vocab-1000 | 4 | 1000 | eager |" in markdown
    if importlib.util.find_spec("matplotlib") is None:  # asked, not imported: the CLI's child did the plotting
        assert "no plots" in completed.stderr
    else:
        assert (tmp_path / "time.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


def _vocab_parallel_and_eager_steps(connection, shape):
    student, partial, full = logits_inputs(shape, torch.float32, torch.device("cpu"))
    settings = LossSettings(beta=0.5)
    provider = PROVIDERS["vocab-parallel"]
    shard = provider.student_input(student)
    step = provider.make(settings)
    calls = [step(shard, partial, full, backward) for backward in (True, False, True)]
    eager = PROVIDERS["eager"].make(settings)(student, partial, full, True)
    def arrays(tensors):  # tensors would travel as file descriptors, which die with this process
        return tuple(t.detach().numpy() for t in tensors)

    connection.send(([arrays(call) for call in calls], arrays(eager), shard.shape[-1]))


def test_the_vocab_parallel_provider_splits_the_measured_inputs_over_its_ranks():
    """Rank 0 (the measuring process) and the rank it starts make the single-process loss of the measured
    inputs, call after call, in both modes; rank 0's gradient is the first columns of the whole one."""
    shape = Shape("vocab-1001", 5, 1001)
    result, status, detail = measure._run_in_child(_vocab_parallel_and_eager_steps, (shape,), timeout_s=120)
    assert status == "ok", detail
    calls, (eager_loss_value, eager_grad), width = result
    assert width == 501 and [len(call) for call in calls] == [2, 1, 2]
    for call in calls:
        torch.testing.assert_close(torch.from_numpy(call[0]), torch.from_numpy(eager_loss_value), rtol=1e-5, atol=1e-6)
    for _, grad in (calls[0], calls[2]):
        torch.testing.assert_close(torch.from_numpy(grad), torch.from_numpy(eager_grad[:, :width]), rtol=1e-4,
                                   atol=1e-7)


def test_cli_smoke_runs_the_hidden_state_providers(tmp_path):
    providers = ["linear+eager", "linear+native", "fused-linear"]
    command = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--device", "cpu", "--vocab", "300",
               "--hidden", "24", "--tokens", "6", "--providers", *providers, "--repeats", "2", "--no-progress",
               "--mode", "forward+backward", "--out", str(tmp_path)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = {(r["provider"], r["metric"]): r for r in csv.DictReader(handle)}
    for provider in providers:
        expected = "unavailable" if provider == "linear+native" and not backends.native_available() else "ok"
        assert rows[(provider, "time_ms")]["status"] == expected, rows[(provider, "time_ms")]["detail"]
