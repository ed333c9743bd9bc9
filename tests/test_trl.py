"""aropd_kernels.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss.

TRL's function evaluated in float64 on the same (already rounded) inputs is the gold; TRL's function
in float32, its gradient rounded to the student's dtype, is the straightforward computation whose
error sets the gradient tolerance (SPEC §4, the rules of tests/conftest.py). Every backend runs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from aropd_kernels.integrations.trl import TRL_REDUCTIONS, generalized_jsd_loss
from conftest import assert_grad_close, assert_loss_close, backends_under_test, device_for, gold

pytest.importorskip("trl", reason="the TRL comparison needs trl: pip install -e '.[trl]'")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
from trl.experimental.gkd import GKDTrainer  # noqa: E402

trl_generalized_jsd_loss = GKDTrainer.generalized_jsd_loss


class Call:
    """One call of the loss: inputs and arguments, run through TRL or through the adapter."""

    def __init__(self, student, teacher, labels=None, *, beta=0.5, temperature=1.0, reduction="batchmean",
                 num_items_in_batch=None, seed=0):
        self.student, self.teacher, self.labels = student, teacher, labels
        self.kwargs = dict(beta=beta, temperature=temperature, reduction=reduction,
                           num_items_in_batch=num_items_in_batch)
        self.per_token = reduction == "none" and num_items_in_batch is None
        # The incoming gradient: 1 for a scalar loss, as loss.backward() gives. For per-token results,
        # uneven weights check each token's share; not for half-precision logits, whose stored gradient
        # is rounded before an incoming gradient other than 1 scales it (docs/api.md), a second
        # rounding that the plain computation does not have.
        self.cotangent = torch.ones(self._result_shape(), dtype=torch.float64)
        if self.per_token and student.dtype == torch.float32:
            self.cotangent += torch.rand(self.cotangent.shape, generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.float64) - 0.5

    def _result_shape(self):
        if not self.per_token:
            return ()
        if self.labels is None:
            return self.student.shape[:-1]
        return (int((self.labels != -100).sum()),)

    def trl(self, dtype):
        """TRL's value (summed over V for reduction="none", the adapter's documented result) and gradient."""
        student = self.student.detach().to(dtype).requires_grad_(True)
        value = trl_generalized_jsd_loss(student, self.teacher.to(dtype), self.labels, **self.kwargs)
        if self.per_token:
            value = value.sum(-1)
        (grad,) = torch.autograd.grad((value * self.cotangent.to(dtype)).sum(), student)
        return value.detach(), grad

    def ours(self, backend):
        device = device_for(backend)
        kwargs = dict(self.kwargs)
        if isinstance(kwargs["num_items_in_batch"], torch.Tensor):
            kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"].to(device)
        student = self.student.detach().to(device).requires_grad_(True)
        labels = None if self.labels is None else self.labels.to(device)
        value = generalized_jsd_loss(student, self.teacher.to(device), labels, backend=backend, **kwargs)
        (value * self.cotangent.to(device, torch.float32)).sum().backward()
        return value.detach().cpu(), student.grad.cpu()

    def gradient_unit(self) -> float:
        """The largest factor d(result)/d(D_i) over tokens, over the temperature: the gradient's natural
        unit (tests/conftest.py). TRL's denominators, written down once more as the expectation."""
        counted = self.student.shape[:-1].numel() if self.labels is None else int((self.labels != -100).sum())
        num_items, reduction = self.kwargs["num_items_in_batch"], self.kwargs["reduction"]
        if num_items is not None:
            factor = 1 / float(num_items)
        elif reduction == "batchmean":
            factor = 1 / max(counted if self.labels is not None else self.student.shape[0], 1)
        elif reduction == "mean":
            factor = 1 / max(counted * self.student.shape[-1], 1)
        else:
            factor = self.cotangent.abs().max().item() if self.cotangent.numel() else 0.0
        return factor / self.kwargs["temperature"]


def check_matches_trl(call: Call, backend: str) -> None:
    expected, expected_grad = call.trl(torch.float64)
    _, plain_grad = call.trl(torch.float32)
    value, grad = call.ours(backend)
    assert value.dtype == torch.float32 and grad.dtype == call.student.dtype
    assert value.shape == expected.shape
    assert_loss_close(value.reshape(-1), expected.reshape(-1), "loss")
    vocab = call.student.shape[-1]
    assert_grad_close(grad.reshape(-1, vocab), expected_grad.reshape(-1, vocab),
                      plain_grad.to(call.student.dtype).reshape(-1, vocab), call.gradient_unit())


def _logits(shape, seed, dtype=torch.float32, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def _labels(batch_shape, vocab, seed, ignore_fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, batch_shape, generator=generator)
    return torch.where(torch.rand(batch_shape, generator=generator) < ignore_fraction, -100, labels)


LABELS = {
    "no labels": lambda shape, vocab: None,
    "labels with -100": lambda shape, vocab: _labels(shape, vocab, seed=5),
}
NUM_ITEMS = {"none": None, "int": 11, "tensor": torch.tensor(11), "float tensor": torch.tensor(6.5)}


@pytest.mark.parametrize("num_items", NUM_ITEMS, ids=str)
@pytest.mark.parametrize("labels", LABELS, ids=str)
@pytest.mark.parametrize("reduction", TRL_REDUCTIONS)
def test_every_reduction_with_and_without_labels_and_num_items_matches_trl(backend, reduction, labels, num_items):
    shape, vocab = (3, 4), 97
    call = Call(_logits((*shape, vocab), 1), _logits((*shape, vocab), 2), LABELS[labels](shape, vocab), beta=0.3,
                temperature=0.8, reduction=reduction, num_items_in_batch=NUM_ITEMS[num_items])
    check_matches_trl(call, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
def test_beta_and_dtype_match_trl(backend, beta, dtype):
    shape, vocab = (2, 5), 1031
    call = Call(_logits((*shape, vocab), 3, dtype), _logits((*shape, vocab), 4, dtype), _labels(shape, vocab, 6),
                beta=beta, temperature=1.7)
    check_matches_trl(call, backend)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_trl_beta_endpoints_are_the_spec_forward_and_reverse_kl(beta):
    """beta=0 is KL(teacher || student) and beta=1 KL(student || teacher) in TRL as in SPEC §1 (the
    float64 gold), so the adapter passes beta through unchanged."""
    student, teacher = _logits((6, 53), 7, torch.float64), _logits((6, 53), 8, torch.float64)
    trl_per_token = trl_generalized_jsd_loss(student, teacher, beta=beta, temperature=0.9, reduction="none").sum(-1)
    expected = gold(student, teacher, teacher, lam=0.0, clip=math.inf, beta=beta, temperature=0.9).loss
    torch.testing.assert_close(trl_per_token, expected)
    other_end = gold(student, teacher, teacher, lam=0.0, clip=math.inf, beta=1.0 - beta, temperature=0.9).loss
    assert not torch.allclose(trl_per_token, other_end)


def test_compute_loss_alignment_slices_are_taken_as_they_are(backend):
    """GKDTrainer.compute_loss hands over logits[:, :-1] and labels[:, 1:]: views, not copies."""
    vocab = 301
    student, teacher = _logits((2, 7, vocab), 9), _logits((2, 7, vocab), 10)
    labels = _labels((2, 7), vocab, 11)
    labels[:, :3] = -100  # the prompt
    call = Call(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=0.5)
    assert not call.student.is_contiguous()
    check_matches_trl(call, backend)


@st.composite
def trl_calls(draw) -> Call:
    vocab = draw(st.sampled_from([1, 2, 7, 64, 257, 1031]))
    batch_shape = draw(st.sampled_from([(1, 1), (2, 5), (3, 4), (4,), (1, 7)]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 4.0]))
    student = _logits((*batch_shape, vocab), seed, dtype, scale)
    teacher = _logits((*batch_shape, vocab), seed + 1, draw(st.sampled_from([dtype, torch.float32])), scale)
    labels = draw(st.sampled_from(["none", "some -100", "all -100"]))
    labels = None if labels == "none" else _labels(batch_shape, vocab, seed, 1.0 if labels == "all -100" else 0.3)
    num_items = draw(st.sampled_from([None, "int", "tensor"]))
    if num_items is not None:
        count = draw(st.integers(1, 100))
        num_items = count if num_items == "int" else torch.tensor(count)
    reduction = draw(st.sampled_from(TRL_REDUCTIONS))
    # TRL's mean of no term is NaN, where the adapter returns 0 (its own test below)
    assume(not (reduction == "mean" and num_items is None and labels is not None and (labels == -100).all()))
    return Call(student, teacher, labels, beta=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.01, 0.99))),
                temperature=draw(st.sampled_from([1.0, 0.7, 2.0])), reduction=reduction,
                num_items_in_batch=num_items, seed=seed)


@given(call=trl_calls())
def test_matches_trl_on_drawn_calls(backend, call):
    check_matches_trl(call, backend)


def test_mean_over_no_counted_token_is_zero_where_trl_gives_nan(backend):
    device = device_for(backend)
    student, teacher = _logits((2, 3, 17), 12), _logits((2, 3, 17), 13)
    labels = torch.full((2, 3), -100)
    assert torch.isnan(trl_generalized_jsd_loss(student, teacher, labels, reduction="mean"))
    leaf = student.to(device).requires_grad_(True)
    loss = generalized_jsd_loss(leaf, teacher.to(device), labels.to(device), reduction="mean", backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("labels", LABELS, ids=str)
def test_none_returns_trls_terms_summed_over_the_vocabulary(backend, labels):
    device = device_for(backend)
    shape, vocab = (2, 5), 33
    student, teacher, labels = _logits((*shape, vocab), 14), _logits((*shape, vocab), 15), LABELS[labels](shape, vocab)
    terms = trl_generalized_jsd_loss(student, teacher, labels, reduction="none")
    ours = generalized_jsd_loss(student.to(device), teacher.to(device), None if labels is None else labels.to(device),
                                reduction="none", backend=backend)
    assert ours.shape == terms.shape[:-1]  # [B, T] without labels, the counted tokens with them
    assert_loss_close(ours, terms.double().sum(-1), "per-token loss")


def test_bad_input_is_refused_before_any_work():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        generalized_jsd_loss(student, teacher, reduction="token_mean")
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        generalized_jsd_loss(student, teacher, [[0, 1, 2], [0, 1, 2]], reduction="mean")
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        generalized_jsd_loss([[1.0]], teacher, reduction="mean")
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd_loss(student, teacher, beta=1.5)
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        generalized_jsd_loss(student, teacher, num_items_in_batch=0)


# --- the runnable drop-in: python/trl_gkd_dropin.py -------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "python" / "trl_gkd_dropin.py"


# The Triton interpreter is held against TRL by the function-level tests above; a training run through
# it would take minutes.
@pytest.mark.parametrize("backend", [name for name in backends_under_test() if name != "triton"])
def test_gkd_dropin_example_trains_and_matches_trl_on_a_batch(backend):
    repo_root = str(EXAMPLE.parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    # --inplace-grad: the gradient overwrites the logits of TRL's compute_loss, and still matches TRL's
    completed = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3", "--backend", backend, "--inplace-grad"],
                               capture_output=True, text=True, timeout=180, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    comparison = re.search(r"loss TRL (\S+), aropd_kernels (\S+); largest student-gradient difference (\S+) of",
                           completed.stdout)
    assert comparison, completed.stdout
    trl_loss, kernel_loss, grad_difference = (float(value.rstrip(";")) for value in comparison.groups())
    assert_loss_close(torch.tensor([kernel_loss]), torch.tensor([trl_loss]), "batch loss")
    assert grad_difference < 1e-4  # float32 through the whole model: parameter gradients agree closely
    losses = re.search(r"training losses: (.+)", completed.stdout)
    assert losses, completed.stdout
    values = [float(value) for value in losses.group(1).split(", ")]
    assert len(values) == 3 and all(math.isfinite(value) for value in values)
