"""What the benchmark compares: ways to compute the AR-OPD loss (and the student gradient).

A provider is a name, a ``make(settings)`` returning a ``step`` and a ``why_unavailable(device,
dtype)`` that returns None when it can run. ``step(student, partial, full, backward)`` computes the
batch-mean loss, and with ``backward`` also the student gradient; it returns every tensor it made so
that the caller can hold them while memory is measured. ``student`` requires grad; ``backward=False``
runs under ``torch.no_grad()`` (a loss evaluated for logging). A provider's ``student_input`` makes
the student tensor each call receives, before its timer starts: the shared leaf itself, or for the
``inplace_grad`` providers a fresh non-leaf copy, as a model's forward hands its logits to the loss.

The ``linear+`` and ``fused-linear`` providers start one step earlier, from the lm_head's inputs (a
provider's ``inputs`` makes them): ``step(student_hidden, student_weight, partial_hidden, full_hidden,
teacher_weight, backward)`` computes the logits too, and with ``backward`` the gradients of the
student's hidden states and weight.

Adding a provider is a function that builds a step and one line in ``PROVIDERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from aropd_kernels import anchored_residual_kl, backends, fused_linear, fused_linear_anchored_residual_kl
from bench import vocab_parallel
from bench.shapes import Shape


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyper-parameters, the public API's defaults unless the command line says otherwise."""

    lam: float = 1.0
    clip: float = 5.0
    beta: float = 1.0
    temperature: float = 1.0
    chunk_rows: int | None = None  # rows per block for the chunked provider; None: by vocabulary size
    teachers: int = 2  # 2: the anchored loss (partial and full views); 1: one teacher (bench/one_teacher.py)
    native_isa: str | None = None  # the native kernel's instruction-set copy; None: the best this CPU runs


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple]


def eager_loss(student, partial, full, settings: LossSettings, reduce: str = "mean") -> torch.Tensor:
    """The AR-OPD loss as a trainer author writes it in torch: float32 log-softmaxes, then the divergence.

    Written independently of aropd_kernels.reference on purpose: this is the user's baseline, the
    reference is the package's spec. Finite logits assumed, as in a typical training loop.
    """
    inv_t = 1.0 / settings.temperature
    log_student = torch.log_softmax(student.float() * inv_t, dim=-1)
    log_partial = torch.log_softmax(partial.float() * inv_t, dim=-1)
    log_full = torch.log_softmax(full.float() * inv_t, dim=-1)
    residual = (log_full - log_partial).clamp(-settings.clip, settings.clip)
    log_target = torch.log_softmax(log_partial + settings.lam * residual, dim=-1)
    per_token = per_token_divergence(log_student, log_target, settings.beta)
    return per_token.mean() if reduce == "mean" else per_token.sum()


def per_token_divergence(log_student, log_target, beta: float) -> torch.Tensor:
    """Reverse KL (beta 1), forward KL (beta 0) or the generalized JSD between, per row, from float32
    log-probabilities: the eager baselines' divergence."""
    if beta == 1.0:
        return (log_student.exp() * (log_student - log_target)).sum(-1)
    if beta == 0.0:
        return (log_target.exp() * (log_target - log_student)).sum(-1)
    log_mixture = torch.logaddexp(log_target + math.log(beta), log_student + math.log1p(-beta))
    return (beta * (log_target.exp() * (log_target - log_mixture)).sum(-1)
            + (1 - beta) * (log_student.exp() * (log_student - log_mixture)).sum(-1))


def autograd_step(loss_fn: Callable[..., torch.Tensor]) -> Step:
    """A step that calls ``loss_fn(student, partial, full)`` and, for backward, ``torch.autograd.grad``."""

    def step(student, partial, full, backward):
        if not backward:
            with torch.no_grad():
                return (loss_fn(student, partial, full),)
        loss = loss_fn(student, partial, full)
        (grad,) = torch.autograd.grad(loss, student)
        return loss, grad

    return step


def make_eager(settings: LossSettings) -> Step:
    return autograd_step(lambda s, a, f: eager_loss(s, a, f, settings))


def make_compiled(settings: LossSettings) -> Step:
    """torch.compile of the eager loss, with the token count N dynamic and the vocabulary static.

    That is where torch.compile's automatic dynamic shapes settle in training, once a second batch
    brings a different N; it also lets one compilation (cached on disk) serve every N of a vocabulary.
    """
    step = autograd_step(torch.compile(lambda s, a, f: eager_loss(s, a, f, settings)))

    def compiled_step(student, partial, full, backward):
        for logits in (student, partial, full):
            torch._dynamo.maybe_mark_dynamic(logits, 0)
        return step(student, partial, full, backward)

    return compiled_step


def chunk_rows(settings: LossSettings, vocab: int) -> int:
    """Rows per block: the user's choice, else the largest power of two keeping a block within 2^24
    elements (64 MiB per float32 intermediate), as a trainer would size it."""
    if settings.chunk_rows:
        return settings.chunk_rows
    return 2 ** max(0, (2**24 // vocab).bit_length() - 1)


def make_chunked(settings: LossSettings) -> Step:
    """The usual memory workaround: the eager loss over blocks of rows, each block's graph freed at once."""

    def step(student, partial, full, backward):
        n_tokens, vocab = student.shape
        rows = chunk_rows(settings, vocab)
        blocks = [slice(start, start + rows) for start in range(0, n_tokens, rows)]
        if not backward:
            with torch.no_grad():
                return (sum(eager_loss(student[b], partial[b], full[b], settings, "sum") for b in blocks) / n_tokens,)
        grad = torch.empty_like(student)
        loss = student.new_zeros((), dtype=torch.float32)
        for block in blocks:
            student_block = student[block].detach().requires_grad_()
            block_loss = eager_loss(student_block, partial[block], full[block], settings, "sum") / n_tokens
            grad[block] = torch.autograd.grad(block_loss, student_block)[0]
            loss += block_loss.detach()
        return loss, grad

    return step


def package_provider(backend: str, inplace_grad: bool = False) -> tuple[Callable[[LossSettings], Step], Callable]:
    """``make`` and ``why_unavailable`` for aropd_kernels.anchored_residual_kl(backend=backend)."""

    def make(settings: LossSettings) -> Step:
        if backend == "native" and settings.native_isa is not None:
            from aropd_kernels import native

            native._select_instruction_set(settings.native_isa)  # in this measuring process only
        return autograd_step(lambda s, a, f: anchored_residual_kl(
            s, a, f, lam=settings.lam, clip=settings.clip, beta=settings.beta,
            temperature=settings.temperature, reduction="batchmean", backend=backend,
            inplace_grad=inplace_grad))

    def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        return backend_refusal(backend, device, (dtype,) * 3)

    return make, why_unavailable


def backend_refusal(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why aropd_kernels' ``backend`` cannot be timed on ``device`` with inputs of ``dtypes``; None if it can."""
    if backend == "triton" and device.type != "cuda":
        return "the Triton backend runs on CUDA devices (its CPU interpreter is for tests, not timing)"
    try:
        backends.resolve(backend, device, dtypes)
    except (ValueError, ImportError) as refusal:  # ImportError: the backend's module is not in this install
        return str(refusal)
    return None


def always_available(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


# --- from hidden states: the lm_head matmuls, then the loss ----------------------------------------------


class Unavailable(Exception):
    """A provider cannot run on this shape (reported as unavailable, with this message)."""


def logits_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Student (requires grad), partial-teacher and full-teacher logits [N, V], standard deviation 2."""
    generator = torch.Generator(device=device).manual_seed(0)

    def logits():
        return torch.randn(shape.n_tokens, shape.vocab, generator=generator, dtype=dtype, device=device).mul_(2.0)

    return logits().requires_grad_(), logits(), logits()


def one_teacher_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Student (requires grad) and teacher logits [N, V], the same draws as :func:`logits_inputs`; None
    where the full teacher would be."""
    student, teacher, _ = logits_inputs(shape, dtype, device)
    return student, teacher, None


def hidden_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Student hidden states [N, H] and lm_head weight [V, H] (both require grad), the teacher's two views'
    hidden states and its weight; logits of standard deviation 2, as for the other providers."""
    if shape.hidden is None:
        raise Unavailable(f"no hidden size is known for {shape.model}; pass --hidden H")
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(rows, std):
        return torch.randn(rows, shape.hidden, generator=generator, dtype=dtype, device=device).mul_(std)

    weight_std = 2.0 / math.sqrt(shape.hidden)
    return (normal(shape.n_tokens, 1.0).requires_grad_(), normal(shape.vocab, weight_std).requires_grad_(),
            normal(shape.n_tokens, 1.0), normal(shape.n_tokens, 1.0), normal(shape.vocab, weight_std))


def hidden_step(loss_fn: Callable[..., torch.Tensor]) -> Callable:
    """A step that calls ``loss_fn(*inputs)`` and, for backward, takes the gradients of the student's hidden
    states and weight."""

    def step(student_hidden, student_weight, partial_hidden, full_hidden, teacher_weight, backward):
        inputs = (student_hidden, student_weight, partial_hidden, full_hidden, teacher_weight)
        if not backward:
            with torch.no_grad():
                return (loss_fn(*inputs),)
        loss = loss_fn(*inputs)
        return (loss, *torch.autograd.grad(loss, (student_hidden, student_weight)))

    return step


def linear_then(loss_fn: Callable[..., torch.Tensor]) -> Callable:
    """``loss_fn`` of the three logits tensors, which the lm_head matmuls make first in the inputs' dtype
    (the teacher's under no_grad), as a model's forward does."""

    def loss(student_hidden, student_weight, partial_hidden, full_hidden, teacher_weight):
        with torch.no_grad():
            partial, full = partial_hidden @ teacher_weight.t(), full_hidden @ teacher_weight.t()
        return loss_fn(student_hidden @ student_weight.t(), partial, full)

    return loss


def make_linear_eager(settings: LossSettings) -> Callable:
    return hidden_step(linear_then(lambda s, a, f: eager_loss(s, a, f, settings)))


def linear_package_provider(backend: str) -> tuple[Callable, Callable]:
    """``make`` and ``why_unavailable`` for the matmuls, then anchored_residual_kl(backend=backend)."""
    _, why_unavailable = package_provider(backend)

    def make(settings: LossSettings) -> Callable:
        return hidden_step(linear_then(lambda s, a, f: anchored_residual_kl(
            s, a, f, lam=settings.lam, clip=settings.clip, beta=settings.beta, temperature=settings.temperature,
            reduction="batchmean", backend=backend)))

    return make, why_unavailable


def fused_linear_provider(model_logits: bool = False, model_sum: bool = False) -> tuple[Callable, Callable]:
    """``make`` and ``why_unavailable`` for fused_linear_anchored_residual_kl; with ``model_logits``, its
    logits in the inputs' half-precision dtype (``logits_dtype=``), as the model's lm_head gives them; with
    ``model_sum`` also the weight gradient summed in bfloat16 (``accum_dtype=``)."""

    def make(settings: LossSettings) -> Callable:
        return hidden_step(lambda hs, ws, hp, hf, wt: fused_linear_anchored_residual_kl(
            hs, ws, hp, hf, wt, lam=settings.lam, clip=settings.clip, beta=settings.beta,
            temperature=settings.temperature, reduction="batchmean", logits_dtype=hs.dtype if model_logits else None,
            accum_dtype=hs.dtype if model_sum else None))

    def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        if model_sum and dtype != torch.bfloat16:
            return f"accum_dtype takes a bfloat16 weight, not {dtype}; use --dtype bfloat16"
        if model_logits and dtype not in fused_linear.HALF_LOGITS_DTYPES:
            return f"logits_dtype takes bfloat16 or float16 inputs, not {dtype}; use --dtype bfloat16"
        return None

    return make, why_unavailable


def the_leaf(student: torch.Tensor) -> torch.Tensor:
    return student


def model_output(student: torch.Tensor) -> torch.Tensor:
    """A non-leaf copy of the student logits with its own storage, which inplace_grad may overwrite."""
    return student * 1


class Provider(NamedTuple):
    make: Callable[[LossSettings], Step]
    why_unavailable: Callable[[torch.device, torch.dtype], str | None]
    description: str
    student_input: Callable[[torch.Tensor], torch.Tensor] = the_leaf
    by_default: bool = True  # in the sweep without --providers
    inputs: Callable[[Shape, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = logits_inputs


PROVIDERS = {
    "eager": Provider(make_eager, always_available, "float32 torch, as a trainer writes it"),
    "compiled": Provider(make_compiled, always_available, "torch.compile of the eager code"),
    "chunked": Provider(make_chunked, always_available, "the eager code over blocks of rows"),
    "triton": Provider(*package_provider("triton"), "aropd_kernels, backend='triton' (CUDA)"),
    "triton-inplace": Provider(*package_provider("triton", inplace_grad=True),
                               "the same with inplace_grad=True: the gradient overwrites the logits", model_output),
    "native": Provider(*package_provider("native"), "aropd_kernels, backend='native' (CPU)"),
    "native-inplace": Provider(*package_provider("native", inplace_grad=True),
                               "the same with inplace_grad=True: the gradient overwrites the logits", model_output),
    "reference": Provider(*package_provider("reference"), "aropd_kernels, backend='reference' (pure torch; "
                          "on request)", by_default=False),
    "vocab-parallel": Provider(vocab_parallel.make, vocab_parallel.why_unavailable,
                               f"aropd_kernels with process_group=: V split over {vocab_parallel.RANKS} gloo ranks "
                               "(CPU), each on its share of the cores (on request)", vocab_parallel.first_shard,
                               by_default=False),
    "linear+eager": Provider(make_linear_eager, always_available,
                             "from hidden states: the lm_head matmuls, then the eager code (on request)",
                             by_default=False, inputs=hidden_inputs),
    "linear+triton": Provider(*linear_package_provider("triton"), "the lm_head matmuls, then 'triton' (on request)",
                              by_default=False, inputs=hidden_inputs),
    "linear+native": Provider(*linear_package_provider("native"), "the lm_head matmuls, then 'native' (on request)",
                              by_default=False, inputs=hidden_inputs),
    "fused-linear": Provider(*fused_linear_provider(),
                             "aropd_kernels.fused_linear_anchored_residual_kl: no N×V logits, float32 logits "
                             "(on request)", by_default=False, inputs=hidden_inputs),
    "fused-linear-model-logits": Provider(*fused_linear_provider(model_logits=True),
                                          "the same with logits_dtype= the inputs' half dtype: the model's own "
                                          "logits, as linear+native's (on request)", by_default=False,
                                          inputs=hidden_inputs),
    "fused-linear-model-dtype": Provider(*fused_linear_provider(model_logits=True, model_sum=True),
                                         "the same with accum_dtype=torch.bfloat16 too: the weight gradient summed "
                                         "in bfloat16, no float32 copy (on request)", by_default=False,
                                         inputs=hidden_inputs),
}
# What run.py compares unless --providers says otherwise.
DEFAULT_PROVIDERS = [name for name, provider in PROVIDERS.items() if provider.by_default]
