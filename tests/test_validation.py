"""SPEC §6: every misuse raises ValueError or TypeError before any work, naming the fix."""

from __future__ import annotations

import math
import warnings
from unittest import mock

import pytest
import torch

from aropd_kernels import anchored_residual_kl, backends


def _inputs(shape=(2, 3, 8), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _leaf_student():
    student, partial, full = _inputs()
    return [student.requires_grad_(True), partial, full]


CASES = [
    # (id, build inputs, kwargs, error, fragment of the message)
    ("student not a tensor", lambda: [[1.0, 2.0]] + _inputs()[1:], {}, TypeError, "student_logits must be a torch.Tensor"),
    ("integer dtype", lambda: [torch.zeros(2, 8, dtype=torch.int64)] + _inputs((2, 8))[1:], {}, TypeError, "float32"),
    ("complex dtype", lambda: _inputs((2, 8))[:2] + [torch.zeros(2, 8, dtype=torch.complex64)], {}, TypeError,
     "full_teacher_logits has dtype"),
    ("zero vocabulary", lambda: _inputs((2, 0)), {}, ValueError, "V >= 1"),
    ("scalar logits", lambda: [torch.tensor(1.0)] * 3, {}, ValueError, "[..., V]"),
    ("shape mismatch", lambda: _inputs()[:2] + [torch.randn(2, 3, 9)], {}, ValueError, "align the teacher"),
    ("device mismatch", lambda: _inputs()[:2] + [torch.randn(2, 3, 8, device="meta")], {}, ValueError, "move it"),
    ("teacher requires grad", lambda: _inputs()[:1] + [torch.randn(2, 3, 8, requires_grad=True)] + _inputs()[2:],
     {}, ValueError, "torch.no_grad()"),
    ("temperature zero", _inputs, {"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ("temperature negative tensor", _inputs, {"temperature": -torch.ones(2, 3)}, ValueError, "temperature must be > 0"),
    ("temperature shape", _inputs, {"temperature": torch.ones(3)}, ValueError, "temperature must have"),
    ("temperature string", _inputs, {"temperature": "1"}, TypeError, "temperature must be a Python number"),
    ("lam negative", _inputs, {"lam": -0.1}, ValueError, "lam must be a finite number >= 0"),
    ("lam infinite", _inputs, {"lam": math.inf}, ValueError, "lam must be"),
    ("lam tensor", _inputs, {"lam": torch.tensor(1.0)}, TypeError, "lam must be a Python number"),
    ("clip zero", _inputs, {"clip": 0.0}, ValueError, "math.inf disables clipping"),
    ("clip nan", _inputs, {"clip": math.nan}, ValueError, "clip must be > 0"),
    ("beta above one", _inputs, {"beta": 1.5}, ValueError, "beta must be in [0, 1]"),
    ("beta bool", _inputs, {"beta": True}, TypeError, "beta must be a Python number"),
    ("unknown reduction", _inputs, {"reduction": "mean"}, ValueError, "reduction must be one of"),
    ("unknown backend", _inputs, {"backend": "cuda"}, ValueError, "backend must be one of"),
    ("seq_mean on 2-D", lambda: _inputs((6, 8)), {"reduction": "seq_mean"}, ValueError, "[B, T, V]"),
    ("labels shape", _inputs, {"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels must have"),
    ("labels float", _inputs, {"labels": torch.zeros(2, 3)}, TypeError, "labels must be a integer"),
    ("mask shape", _inputs, {"mask": torch.ones(6, dtype=torch.bool)}, ValueError, "mask must have"),
    ("mask dtype", _inputs, {"mask": torch.ones(2, 3)}, TypeError, "mask must be a bool"),
    ("weights shape", _inputs, {"weights": torch.ones(2, 3, 1)}, ValueError, "weights must have"),
    ("weights integer", _inputs, {"weights": torch.ones(2, 3, dtype=torch.long)}, TypeError, "weights must be a floating"),
    ("num_items with sum", _inputs, {"reduction": "sum", "num_items_in_batch": 4}, ValueError, "only applies"),
    ("inplace on a view of a leaf", lambda: [_leaf_student()[0][:, :-1]] + [x[:, :-1] for x in _inputs()[1:]],
     {"inplace_grad": True}, ValueError, "a view of one"),
    ("inplace float16", lambda: [(_inputs()[0].half().requires_grad_(True) * 1)] + _inputs()[1:],
     {"inplace_grad": True}, ValueError, "GradScaler"),
    ("num_items zero", _inputs, {"num_items_in_batch": 0}, ValueError, "num_items_in_batch must be a finite number > 0"),
    ("num_items zero tensor", _inputs, {"num_items_in_batch": torch.tensor(0)}, ValueError,
     "num_items_in_batch must be a finite number > 0"),
    ("num_items nan", _inputs, {"num_items_in_batch": math.nan}, ValueError, "num_items_in_batch must be"),
    ("temperature inf tensor", _inputs, {"temperature": torch.full((2, 3), math.inf)}, ValueError,
     "temperature must be > 0 and finite"),
    ("weights require grad", _inputs, {"weights": torch.ones(2, 3, requires_grad=True)}, ValueError,
     "weights.detach()"),
    ("mask integer", _inputs, {"mask": torch.ones(2, 3, dtype=torch.long)}, TypeError, "mask.bool()"),
    ("inplace on a leaf", _leaf_student, {"inplace_grad": True}, ValueError, "non-leaf"),
    ("float64 to native", _inputs, {"backend": "native"}, ValueError, None),
]


@pytest.mark.parametrize("build, kwargs, error, fragment", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_before_any_kernel(build, kwargs, error, fragment):
    inputs = build()
    if kwargs.get("backend") == "native" and fragment is None:
        inputs = [x.double() for x in inputs]
        fragment = "float64"
    with mock.patch.object(backends, "compute_rows", side_effect=AssertionError("a kernel ran")):
        with pytest.raises(error) as raised:
            anchored_residual_kl(*inputs, **kwargs)
    assert fragment in str(raised.value)


def test_triton_on_cpu_without_the_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: None)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        anchored_residual_kl(*_inputs(), backend="triton")


def test_native_when_not_built_names_the_fix(monkeypatch):
    monkeypatch.setattr(backends, "native_unavailable_reason", lambda: "no C++ compiler was found")
    with pytest.raises(ValueError, match="backend='native' is not built: no C\\+\\+ compiler"):
        anchored_residual_kl(*_inputs(), backend="native")


def test_auto_on_cuda_without_triton_warns_once_and_says_how_to_fix_it(monkeypatch):
    """The reference fallback materializes N×V float32 tensors: say so, once per process."""
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda: "triton is not installed")
    monkeypatch.setattr(backends, "_warned_reference_on_cuda", False)
    with pytest.warns(RuntimeWarning, match="materializes.*triton is not installed.*Install the Triton"):
        assert backends.resolve("auto", torch.device("cuda"), (torch.bfloat16,)) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cuda"), (torch.bfloat16,)) == "reference"
