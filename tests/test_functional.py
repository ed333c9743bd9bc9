"""The public API: reductions, skipped rows, weights, views, diagnostics, inplace_grad, the module."""

from __future__ import annotations

import math

import pytest
import torch

from aropd_kernels import AnchoredResidualKL, anchored_residual_kl, anchored_residual_target
from aropd_kernels.rows import as_rows


def _problem(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student, partial, full = (torch.randn(*shape, generator=generator).mul(2).to(dtype) for _ in range(3))
    return student, partial, full


def _grad(loss_fn, student):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student)
    loss.backward()
    return loss.detach(), student.grad


def test_reductions_follow_from_the_per_token_values(backend):
    student, partial, full = _problem(3, 4, 29, seed=1)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) > 0.4
    weights = torch.rand(3, 4, generator=torch.Generator().manual_seed(3))
    common = dict(mask=mask, weights=weights, backend=backend)

    def per_token(s):
        return anchored_residual_kl(s, partial, full, reduction="none", **common)

    manual = {
        "sum": lambda s: per_token(s).sum(),
        "batchmean": lambda s: per_token(s).sum() / mask.sum(),
        "seq_mean": lambda s: (per_token(s).sum(-1) / mask.sum(-1).clamp(min=1)).mean(),
    }
    for reduction, expected_fn in manual.items():
        loss, grad = _grad(lambda s: anchored_residual_kl(s, partial, full, reduction=reduction, **common), student)
        expected_loss, expected_grad = _grad(expected_fn, student)
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(grad, expected_grad)


def test_num_items_in_batch_replaces_the_batchmean_denominator():
    student, partial, full = _problem(2, 5, 13, seed=4)
    total = anchored_residual_kl(student, partial, full, reduction="sum")
    for items in (37, torch.tensor(37)):
        loss = anchored_residual_kl(student, partial, full, reduction="batchmean", num_items_in_batch=items)
        torch.testing.assert_close(loss, total / 37)


def test_labels_skip_ignore_index_rows_with_exact_zero_gradient():
    student, partial, full = _problem(2, 6, 17, seed=5)
    labels = torch.tensor([[1, 2, -100, 3, -100, 4], [-100, -100, 5, 6, 7, 8]])
    loss, grad = _grad(lambda s: anchored_residual_kl(s, partial, full, labels=labels, reduction="none").sum(),
                       student)
    skipped = labels == -100
    assert torch.all(grad[skipped] == 0)
    assert torch.all(grad[~skipped].abs().sum(-1) > 0)
    per_token = anchored_residual_kl(student, partial, full, labels=labels, reduction="none")
    assert torch.all(per_token[skipped] == 0)
    masked = anchored_residual_kl(student, partial, full, mask=~skipped, reduction="batchmean")
    torch.testing.assert_close(anchored_residual_kl(student, partial, full, labels=labels), masked)


def test_custom_ignore_index_and_mask_combine():
    student, partial, full = _problem(4, 9, seed=6)
    labels = torch.tensor([0, 7, 1, 7])
    mask = torch.tensor([True, True, False, True])
    per_token = anchored_residual_kl(student, partial, full, labels=labels, ignore_index=7, mask=mask, reduction="none")
    assert per_token[0] > 0 and torch.all(per_token[1:] == 0)


def test_all_rows_skipped_gives_zero_loss_and_zero_gradient():
    student, partial, full = _problem(3, 11, seed=7)
    for reduction in ("batchmean", "sum", "seq_mean"):
        shape = (1, 3, 11) if reduction == "seq_mean" else (3, 11)
        loss, grad = _grad(lambda s: anchored_residual_kl(
            s.view(shape), partial.view(shape), full.view(shape), mask=torch.zeros(shape[:-1], dtype=torch.bool),
            reduction=reduction), student)
        assert loss.item() == 0 and torch.all(grad == 0)


def test_slices_are_viewed_not_copied_and_transposes_are_copied():
    buffer = torch.randn(2, 9, 31)
    sliced, flat, transposed = buffer[:, :-1, :], buffer.view(18, 31)[:16], torch.randn(31, 16).t()
    (view,) = as_rows(sliced)
    assert view.data_ptr() == sliced.data_ptr() and view.shape == (2, 8, 31)
    (view,) = as_rows(flat)
    assert view.shape == (1, 16, 31) and view.data_ptr() == flat.data_ptr()
    (view,) = as_rows(transposed)
    assert view.stride(-1) == 1


def test_the_three_views_share_batch_and_positions():
    sliced = torch.randn(2, 9, 31)[:, :-1]
    contiguous = torch.randn(2, 8, 31)
    views = as_rows(sliced, contiguous, contiguous)
    assert [v.shape for v in views] == [(2, 8, 31)] * 3
    assert views[0].data_ptr() == sliced.data_ptr() and views[1].data_ptr() == contiguous.data_ptr()
    unit_dims = torch.randn(3, 1, 4, 7).transpose(1, 2)  # a size-1 dimension with an odd stride
    (view,) = as_rows(unit_dims)
    assert view.shape == (1, 12, 7) and view.data_ptr() == unit_dims.data_ptr()


@pytest.mark.parametrize("layout", ["sliced", "transposed", "4d"])
def test_non_contiguous_inputs_give_the_contiguous_result(backend, layout):
    student, partial, full = _problem(2, 4, 23, seed=8)
    views = {
        "sliced": lambda x: torch.cat([x, x[:, :1]], dim=1)[:, :-1],
        "transposed": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
        "4d": lambda x: x.view(2, 2, 2, 23).transpose(0, 2),  # no [B, T, V] view exists: copied
    }
    view = views[layout]
    expected_loss, expected_grad = _grad(lambda s: anchored_residual_kl(s, partial, full, backend=backend), student)
    loss, grad = _grad(lambda s: anchored_residual_kl(view(s), view(partial), view(full), backend=backend), student)
    torch.testing.assert_close(loss, expected_loss)  # batchmean does not depend on the row order
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("sliced", ["student", "partial", "full"])
def test_each_input_may_have_its_own_row_strides(backend, sliced):
    """A [:, :-1] slice beside contiguous tensors: every backend must index each by its own strides."""
    inputs = dict(zip(("student", "partial", "full"), _problem(2, 5, 19, seed=17)))
    expected_loss, expected_grad = _grad(
        lambda s: anchored_residual_kl(s, inputs["partial"], inputs["full"], reduction="none", backend=backend).sum(),
        inputs["student"])
    inputs[sliced] = torch.cat([inputs[sliced], torch.randn(2, 2, 19)], dim=1)[:, :-2]
    loss, grad = _grad(
        lambda s: anchored_residual_kl(s, inputs["partial"], inputs["full"], reduction="none", backend=backend).sum(),
        inputs["student"])
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_diagnostics_are_float32_outside_autograd_and_zero_on_skipped_rows():
    student, partial, full = _problem(5, 19, seed=9, dtype=torch.bfloat16)
    mask = torch.tensor([True, False, True, True, False])
    loss, diagnostics = anchored_residual_kl(
        student.requires_grad_(True), partial, full, mask=mask, return_diagnostics=True)
    assert loss.dtype == torch.float32
    for tensor in diagnostics[:4]:
        assert tensor.dtype == torch.float32 and tensor.shape == (5,) and not tensor.requires_grad
        assert torch.all(tensor[~mask] == 0)
    assert torch.all(diagnostics.student_entropy[mask] > 0)
    assert torch.all(diagnostics.clipped_mass >= 0) and torch.all(diagnostics.clipped_mass <= 1)


def test_gradient_is_handed_over_and_backward_twice_gives_the_same_gradient():
    student, partial, full = _problem(3, 15, seed=10)
    weight = torch.randn(15, 15, requires_grad=True)
    logits = student @ weight
    loss = anchored_residual_kl(logits, partial, full)
    first = torch.autograd.grad(loss, weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss, weight, retain_graph=True)[0]
    torch.testing.assert_close(first, second)
    doubled = torch.autograd.grad(loss, weight, grad_outputs=torch.tensor(2.0), retain_graph=True)[0]
    torch.testing.assert_close(doubled, 2 * first)
    torch.testing.assert_close(torch.autograd.grad(loss, weight)[0], first)


def test_inplace_grad_writes_the_gradient_into_the_student_buffer():
    student, partial, full = _problem(4, 21, seed=11, dtype=torch.bfloat16)
    weight = torch.eye(21, dtype=torch.bfloat16, requires_grad=True)
    expected = torch.autograd.grad(anchored_residual_kl(student @ weight, partial, full), weight)[0]
    logits = student @ weight
    loss = anchored_residual_kl(logits, partial, full, inplace_grad=True)
    (actual,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(actual, expected)
    assert not torch.equal(logits, student), "the logits buffer now holds the gradient"


def test_inplace_grad_invalidates_other_saved_uses_of_the_logits():
    student, partial, full = _problem(2, 8, seed=12)
    logits = student.clone().requires_grad_(True) * 1.0
    other_use = (logits * logits).sum()  # saves logits for its own backward
    loss = anchored_residual_kl(logits, partial, full, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other_use).backward()


def test_no_gradient_work_without_requires_grad():
    student, partial, full = _problem(2, 8, seed=13)
    before = student.clone()
    loss = anchored_residual_kl(student, partial, full, inplace_grad=True)
    assert not loss.requires_grad and torch.equal(student, before)


def test_module_stores_its_arguments():
    student, partial, full = _problem(3, 10, seed=14)
    module = AnchoredResidualKL(lam=0.7, clip=2.0, beta=0.3, reduction="sum")
    assert "lam=0.7" in repr(module)
    torch.testing.assert_close(
        module(student, partial, full),
        anchored_residual_kl(student, partial, full, lam=0.7, clip=2.0, beta=0.3, reduction="sum"))


def test_per_token_temperature_matches_row_by_row_scalar_temperature():
    student, partial, full = _problem(3, 12, seed=15)
    temperature = torch.tensor([0.5, 1.0, 2.0])
    per_token = anchored_residual_kl(student, partial, full, temperature=temperature, reduction="none")
    for row in range(3):
        expected = anchored_residual_kl(student[row], partial[row], full[row],
                                        temperature=temperature[row].item(), reduction="sum")
        torch.testing.assert_close(per_token[row], expected)


def test_unclipped_residual_accepts_math_inf():
    student, partial, full = _problem(2, 7, seed=16)
    assert math.isfinite(anchored_residual_kl(student, partial, full, clip=math.inf).item())


def test_forward_kl_is_infinite_where_the_student_forbids_a_target_token_and_its_gradient_finite(backend):
    student, partial, full = _problem(3, 9, seed=18)
    student[1, 4] = -math.inf  # the student cannot emit a token the target allows
    _, grad = _grad(
        lambda s: anchored_residual_kl(s, partial, full, beta=0.0, reduction="none", backend=backend).sum(), student)
    per_token = anchored_residual_kl(student, partial, full, beta=0.0, reduction="none", backend=backend)
    assert per_token[1] == math.inf and torch.isfinite(per_token[[0, 2]]).all()
    assert torch.isfinite(grad).all()
    expected = torch.softmax(student, -1) - torch.exp(
        anchored_residual_target(partial, full, lam=1.0, clip=5.0))  # (p - q) / T with T = 1
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_seq_mean_skips_sequences_without_an_active_token():
    student, partial, full = _problem(3, 4, 17, seed=19)
    mask = torch.tensor([[True, True, False, True], [False] * 4, [True, False, False, False]])
    per_token = anchored_residual_kl(student, partial, full, mask=mask, reduction="none")
    expected = (per_token[0].sum() / 3 + per_token[2].sum() / 1) / 2  # the empty sequence does not count
    torch.testing.assert_close(anchored_residual_kl(student, partial, full, mask=mask, reduction="seq_mean"), expected)


def test_seq_mean_over_micro_batches_with_the_global_sequence_count(backend):
    """Gradient accumulation: each micro-batch divides by the number of non-empty sequences of the
    whole batch, so that the micro-batch losses and gradients add up to the whole batch's."""
    student, partial, full = _problem(6, 5, 23, seed=20)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(21)) > 0.5
    mask[1] = False
    whole_loss, whole_grad = _grad(lambda s: anchored_residual_kl(
        s, partial, full, mask=mask, reduction="seq_mean", backend=backend), student)
    sequences = int((mask.sum(-1) > 0).sum())
    leaf = student.clone().requires_grad_(True)
    total = sum(anchored_residual_kl(leaf[rows], partial[rows], full[rows], mask=mask[rows], reduction="seq_mean",
                                     num_items_in_batch=count, backend=backend)
                for rows, count in ((slice(0, 2), sequences), (slice(2, 6), torch.tensor(sequences))))
    total.backward()
    torch.testing.assert_close(total.detach(), whole_loss)
    torch.testing.assert_close(leaf.grad, whole_grad)
