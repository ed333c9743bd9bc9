"""bench/run.py --teachers 1: the one-teacher baselines compute the loss, the package providers are thin
calls of the public API, and a tiny sweep runs end to end. No timings are asserted."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench/ is not an installed package

from aropd_kernels import backends, distillation_divergence  # noqa: E402
from bench import measure, report, run  # noqa: E402
from bench.one_teacher import (  # noqa: E402
    ONE_TEACHER_PROVIDERS, eager_one_teacher_loss, make_trl, package_provider,
)
from bench.providers import LossSettings, model_output, one_teacher_inputs  # noqa: E402
from bench.shapes import Shape  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def _logits(n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(n_tokens, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_eager_one_teacher_baseline_matches_the_float64_reference(beta):
    student, teacher = _logits(7, 301, 0), _logits(7, 301, 1)
    student64 = student.double().requires_grad_()
    expected = distillation_divergence(student64, teacher.double(), beta=beta, temperature=1.3, backend="reference")
    (expected_grad,) = torch.autograd.grad(expected, student64)
    student32 = student.clone().requires_grad_()
    loss = eager_one_teacher_loss(student32, teacher, LossSettings(beta=beta, temperature=1.3, teachers=1))
    (grad,) = torch.autograd.grad(loss, student32)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def _eager_step(settings, student, teacher):
    return ONE_TEACHER_PROVIDERS["eager"].make(settings)(student, teacher, None, True)


@pytest.mark.parametrize("anchored", [False, True], ids=["distillation_divergence", "anchored lam=0"])
def test_package_providers_are_thin_calls_of_the_public_api(anchored):
    make, why_unavailable = package_provider("reference", anchored=anchored)  # the path native and triton take
    assert why_unavailable(torch.device("cpu"), torch.bfloat16) is None
    student, teacher = _logits(5, 77, 2), _logits(5, 77, 3)
    student.requires_grad_()
    settings = LossSettings(beta=0.0, teachers=1)
    loss, grad = make(settings)(student, teacher, None, True)
    (forward_only,) = make(settings)(student, teacher, None, False)
    eager_value, eager_grad = _eager_step(settings, student, teacher)
    torch.testing.assert_close(loss, eager_value)
    torch.testing.assert_close(forward_only, eager_value)
    torch.testing.assert_close(grad, eager_grad)


def test_inplace_provider_returns_the_gradient_in_the_logits_it_was_handed():
    make, _ = package_provider("reference", inplace_grad=True)
    student, teacher = _logits(5, 77, 4), _logits(5, 77, 5)
    student.requires_grad_()
    settings = LossSettings(teachers=1)
    logits = model_output(student)
    loss, grad = make(settings)(logits, teacher, None, True)
    eager_value, eager_grad = _eager_step(settings, student, teacher)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(loss, eager_value)
    torch.testing.assert_close(grad, eager_grad)
    assert ONE_TEACHER_PROVIDERS["native-inplace"].student_input is model_output


@pytest.mark.skipif(not HAS_TRL, reason="the trl provider needs trl: pip install -e '.[trl]'")
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_trl_provider_is_the_same_loss(beta):
    student, teacher = _logits(6, 101, 6), _logits(6, 101, 7)
    student.requires_grad_()
    settings = LossSettings(beta=beta, teachers=1)
    loss, grad = make_trl(settings)(student, teacher, None, True)
    eager_value, eager_grad = _eager_step(settings, student, teacher)
    torch.testing.assert_close(loss, eager_value)
    torch.testing.assert_close(grad, eager_grad)


def test_bytes_moved_reads_two_inputs_for_one_teacher():
    shape = Shape("m", n_tokens=3, vocab=5)
    assert report.bytes_moved(shape, torch.bfloat16, "forward+backward", inputs=2) == 15 * 6
    assert report.bytes_moved(shape, torch.bfloat16, "forward", inputs=2) == 15 * 4


def test_one_teacher_inputs_have_no_full_view():
    student, teacher, full = one_teacher_inputs(Shape("m", 3, 11), torch.bfloat16, torch.device("cpu"))
    assert full is None and student.requires_grad and teacher.shape == student.shape


def test_providers_of_the_other_sweep_are_refused(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--teachers", "1", "--providers", "eager", "chunked"])
    assert "--providers chunked: not a provider with --teachers 1" in capsys.readouterr().err
    assert run.parse_args(["--teachers", "1"]).providers == list(ONE_TEACHER_PROVIDERS)


def test_cli_one_teacher_smoke_writes_the_teachers_column(tmp_path):
    providers = ["eager", "trl", "native", "native-anchored", "triton"]
    command = [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--device", "cpu", "--teachers", "1",
               "--vocab", "64", "--tokens", "4", "--providers", *providers, "--repeats", "2", "--mode",
               "forward+backward", "--no-progress", "--out", str(tmp_path)]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr

    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(providers) * len(report.METRICS) and {r["teachers"] for r in rows} == {"1"}
    status = {r["provider"]: r["status"] for r in rows if r["metric"] == "time_ms"}
    native = "ok" if backends.native_available() else "unavailable"
    assert status == {"eager": "ok", "trl": "ok" if HAS_TRL else "unavailable", "native": native,
                      "native-anchored": native, "triton": "unavailable"}, rows
