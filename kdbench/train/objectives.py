"""Training objectives: a recipe's ``objective`` names one record here — its trainer family (``kind``), its
typed parameters and, for token-level objectives, how one micro-batch becomes a summed loss.

Token-level objectives return the loss *summed* over the micro-batch's counted response tokens; the
engine divides by the number of counted tokens of the whole optimizer step (across micro-batches and
processes), so gradient accumulation and data parallelism do not change the result (METHODS.md,
"Token-level reduction"). The ``preference`` and ``guided`` objectives choose their loss among the
family's forms (:mod:`kdbench.train.preference_forms`, :mod:`kdbench.train.guided_forms`, which register
those two objectives with the family's parameter groups).

A new token-level objective is one :func:`register_objective` call::

    register_objective(Objective("my_kd", kind="token", loss=my_loss, params=(MyParams,), needs_teacher=True))

where ``my_loss(batch: Batch, params: MyParams) -> {"loss": summed loss, <part>: summed value, ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kdbench.config import option
from kdbench.errors import ConfigError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.params import not_negative, positive

KINDS = ("token", "preference", "guided")


@dataclass
class Batch:
    """Aligned tensors of one micro-batch: position t predicts ``targets[:, t]``.

    ``student_logits``: [B, T, V]; ``teacher_logits``: [B, T, V] dense logits, a top-k
    :class:`~kdbench.losses.SparseTeacher` (offline cache) or ``None`` (no teacher); ``targets``:
    [B, T] (−100 = not counted); ``mask``: [B, T] float (1 = counted response position); ``step``: what the
    objective's ``step_stats`` computed over the whole optimizer step (empty outside training: the loss then
    takes the micro-batch as its step). ``teacher_targets``: [B, Tt] the teacher's own targets, for objectives
    across tokenizers (``teacher_logits`` are then [B, Tt, Vt] on the teacher's tokenization). ``extras``:
    per-token tensors [B, T] a sampling form attached to the micro-batch (its ``rollout_*`` keys, aligned like
    ``targets``: MiniLLM's old log-probs, advantages and importance weights); empty otherwise. ``hidden``: for
    objectives with ``hidden_states`` — ``student_hidden`` [B, T, ds] and ``teacher_hidden`` [B, Tt, dt] (last
    layer, aligned like the logits), ``student_input_ids`` [B, T] / ``teacher_input_ids`` [B, Tt] (the token
    each position reads), ``student_embeddings`` / ``student_head`` [Vs, ds] and ``teacher_embeddings`` /
    ``teacher_head`` [Vt, dt] (weights); empty otherwise. ``module``: the objective's own trainable module
    (``Objective.trainable``), or None.
    """

    student_logits: Any
    teacher_logits: Any | None
    targets: Any
    mask: Any
    step: dict = field(default_factory=dict)
    teacher_targets: Any | None = None
    extras: dict = field(default_factory=dict)
    hidden: dict = field(default_factory=dict)
    module: Any | None = None


@dataclass
class TokenKDParams:
    """(1−r)·CE(gold) + r·D(p‖q) (``kd_weighting: mix``, MiniLLM's convention) or CE + r·D (``additive``,
    ADPA Eq. 1)."""

    divergence: str = option("fkl", "The token divergence D (kdbench.losses.DIVERGENCES).")
    divergence_params: dict = option(factory=dict, help="D's parameters, e.g. {beta: 0.5} for jsd.")
    kd_ratio: float = option(0.5, "r, the weight of D.")
    kd_weighting: str = option("mix", "mix: (1-r)*CE + r*D; additive: CE + r*D.")
    temperature: float = option(1.0, "Divides teacher and student logits inside D (and the top-k cache's).")
    temperature_squared: bool = option(False, "Multiply D by temperature squared (Hinton et al.).")

    def __post_init__(self):
        from kdbench.losses.divergences import get_divergence

        if not isinstance(self.divergence_params, dict):
            raise ConfigError("Parameter divergence_params must be a mapping, e.g. {beta: 0.5}.")
        get_divergence(self.divergence).resolve(**self.divergence_params)  # unknown name, parameter or range
        if self.kd_weighting not in ("mix", "additive"):
            raise ConfigError("Parameter kd_weighting must be 'mix' ((1-r)·CE + r·KD) or 'additive' (CE + r·KD).")
        if self.kd_weighting == "mix" and not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"Parameter kd_ratio must be between 0 and 1 with kd_weighting: mix (got {self.kd_ratio}).")
        not_negative("kd_ratio", self.kd_ratio)
        positive("temperature", self.temperature)


@dataclass
class DPKDTokenParams:
    """DPKD's token-level form (the authors' code) + ce_weight·CE on the same gold responses."""

    beta: float = option(0.1, "beta of the per-position preference margin.")
    ce_weight: float = option(0.5, "Weight of the token-mean CE on the gold responses.")
    temperature: float = option(1.0, "Temperature of the top-k cache's teacher (teacher_signal: topk); the loss "
                                     "itself takes the plain softmax.")

    def __post_init__(self):
        positive("beta", self.beta)
        not_negative("ce_weight", self.ce_weight)
        positive("temperature", self.temperature)


def _sft(batch: Batch, params) -> dict:
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": ce, "ce": ce}


def _token_kd(batch: Batch, params: TokenKDParams) -> dict:
    from kdbench.losses import DIVERGENCES

    name = params.divergence
    div = DIVERGENCES[name](batch.student_logits, batch.teacher_logits, batch.mask, temperature=params.temperature,
                            reduction="sum", **params.divergence_params)
    if params.temperature_squared:
        div = div * params.temperature ** 2
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    ratio = params.kd_ratio
    loss = (1 - ratio) * ce + ratio * div if params.kd_weighting == "mix" else ce + ratio * div
    return {"loss": loss, "ce": ce, name: div}


def _dpkd_token(batch: Batch, params: DPKDTokenParams) -> dict:
    from kdbench.losses.guided import dpkd_token

    preference = dpkd_token(batch.student_logits, batch.teacher_logits, batch.mask, beta=params.beta, reduction="sum")
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": preference + params.ce_weight * ce, "ce": ce, "dpkd_token": preference}


@dataclass(frozen=True)
class Objective:
    """One objective a recipe can name.

    ``kind``: the trainer family that runs it (``token``, ``preference``, ``guided``: kdbench.train.api.KINDS);
    ``loss``: for token-level objectives, ``loss(batch, params) -> {"loss": Σ over counted tokens, parts...}``
    (``None`` for the families whose loss is a form chosen by a parameter); ``params``: its typed parameter
    groups (the first one is passed to ``loss``); ``needs_teacher``: a teacher signal in every step;
    ``dense_teacher``: the loss needs the teacher's full distribution (no top-k cache);
    ``step_stats(trainer, micro_batches, params, reduce) -> dict``: a no-gradient pass over the optimizer step's
    micro-batches before its gradient passes (ATKD's split), passed to the loss as ``Batch.step``;
    ``cross_tokenizer``: teacher and student may have different tokenizers — the teacher runs on its own
    tokenization of each example (:mod:`kdbench.train.cross_tokenizer`); ``hidden_states``: the loss reads both
    models' last hidden states, embeddings and heads (``Batch.hidden``); ``trainable(student, teacher, params) ->
    torch.nn.Module``: parameters the objective trains beside the student (DSKD's projectors) — optimised with
    the student at ``params.trainable_lr``, saved with each checkpoint and restored on resume, never part of
    the saved model (:class:`~kdbench.train.trainer_base.StepTrainer`).
    """

    name: str
    kind: str
    loss: Callable[[Batch, Any], dict] | None = None
    params: tuple[type, ...] = ()
    needs_teacher: bool = False
    help: str = ""
    dense_teacher: bool = False
    step_stats: Callable[..., dict] | None = None
    cross_tokenizer: bool = False
    hidden_states: bool = False
    trainable: Callable[..., Any] | None = None


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective, *, replace: bool = False) -> Objective:
    """Add ``objective`` under its name (``replace=True`` redefines one); returns it."""
    if objective.kind not in KINDS:
        raise ConfigError(f"Objective {objective.name} has kind {objective.kind!r}; use one of {', '.join(KINDS)}.")
    if objective.name in OBJECTIVES and not replace:
        raise ConfigError(f"An objective named {objective.name!r} is already registered; pick another name.")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"Recipe names unknown objective {name!r}; known: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


register_objective(Objective("sft", "token", _sft, help="Token-mean cross-entropy on the responses."))
register_objective(Objective("token_kd", "token", _token_kd, (TokenKDParams,), needs_teacher=True,
                             help="CE mixed with a token divergence to the teacher."))
register_objective(Objective("dpkd_token", "token", _dpkd_token, (DPKDTokenParams,), needs_teacher=True,
                             help="DPKD's token-level form (the authors' code) + CE."))

