"""The one-teacher sweep (``bench/run.py --teachers 1``): ways to compute the divergence between the
student and a single teacher, ``q = softmax(teacher / T)``, as OPD, GKD and self-distillation do.

Steps have the signature of :mod:`bench.providers` and receive ``full=None``. The anchored providers
run ``anchored_residual_kl(s, t, t, lam=0)``, the same loss with the teacher read twice: the
comparison that shows what the two-input kernels save.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from aropd_kernels import anchored_residual_kl, distillation_divergence
from bench.providers import (
    PROVIDERS, LossSettings, Provider, Step, always_available, autograd_step, backend_refusal, model_output,
    one_teacher_inputs,
    per_token_divergence,
)


def eager_one_teacher_loss(student, teacher, settings: LossSettings) -> torch.Tensor:
    """The one-teacher loss as a trainer author writes it in torch: two float32 log-softmaxes, then the
    divergence, averaged over the tokens."""
    inv_t = 1.0 / settings.temperature
    log_student = torch.log_softmax(student.float() * inv_t, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() * inv_t, dim=-1)
    return per_token_divergence(log_student, log_teacher, settings.beta).mean()


def make_eager(settings: LossSettings) -> Step:
    return autograd_step(lambda s, t, _: eager_one_teacher_loss(s, t, settings))


def make_compiled(settings: LossSettings) -> Step:
    """torch.compile of the eager loss, N dynamic and V static, as bench/providers.py's ``compiled``."""
    step = autograd_step(torch.compile(lambda s, t, _: eager_one_teacher_loss(s, t, settings)))

    def compiled_step(student, teacher, full, backward):
        for logits in (student, teacher):
            torch._dynamo.maybe_mark_dynamic(logits, 0)
        return step(student, teacher, full, backward)

    return compiled_step


def make_trl(settings: LossSettings) -> Step:
    """TRL's GKDTrainer.generalized_jsd_loss; without labels its batchmean divides by N, the tokens of
    these [N, V] inputs. It computes in the logits' dtype."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
    from trl.experimental.gkd import GKDTrainer

    return autograd_step(lambda s, t, _: GKDTrainer.generalized_jsd_loss(
        s, t, beta=settings.beta, temperature=settings.temperature))


def trl_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e '.[trl]')"
    return None


def package_provider(backend: str, inplace_grad: bool = False, anchored: bool = False) -> tuple:
    """``make`` and ``why_unavailable`` for distillation_divergence(backend=backend), or with
    ``anchored`` for anchored_residual_kl(s, t, t, lam=0, backend=backend)."""

    def loss(s, t, settings: LossSettings):
        common = dict(beta=settings.beta, temperature=settings.temperature, reduction="batchmean",
                      backend=backend, inplace_grad=inplace_grad)
        if anchored:
            return anchored_residual_kl(s, t, t, lam=0.0, **common)
        return distillation_divergence(s, t, **common)

    def make(settings: LossSettings) -> Step:
        return autograd_step(lambda s, t, _: loss(s, t, settings))

    def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        return backend_refusal(backend, device, (dtype,) * (3 if anchored else 2))

    return make, why_unavailable


_PROVIDERS = {
    "eager": Provider(make_eager, always_available, "float32 torch, as a trainer writes it"),
    "compiled": Provider(make_compiled, always_available, "torch.compile of the eager code"),
    "trl": Provider(make_trl, trl_unavailable, "TRL's GKDTrainer.generalized_jsd_loss (in the logits' dtype)"),
    "triton": Provider(*package_provider("triton"), "aropd_kernels.distillation_divergence, backend='triton'"),
    "triton-inplace": Provider(*package_provider("triton", inplace_grad=True),
                               "the same with inplace_grad=True", model_output),
    "triton-anchored": Provider(*package_provider("triton", anchored=True),
                                "anchored_residual_kl(s, t, t, lam=0), backend='triton': the teacher read twice"),
    "native": Provider(*package_provider("native"), "aropd_kernels.distillation_divergence, backend='native'"),
    "native-inplace": Provider(*package_provider("native", inplace_grad=True),
                               "the same with inplace_grad=True", model_output),
    "native-anchored": Provider(*package_provider("native", anchored=True),
                                "anchored_residual_kl(s, t, t, lam=0), backend='native': the teacher read twice"),
}
ONE_TEACHER_PROVIDERS = {name: provider._replace(inputs=one_teacher_inputs) for name, provider in _PROVIDERS.items()}

PROVIDERS_BY_TEACHERS = {1: ONE_TEACHER_PROVIDERS, 2: PROVIDERS}
