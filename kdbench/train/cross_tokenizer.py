"""Token-level KD across tokenizers on the token trainer: the ``uld`` objective (Universal Logit Distillation,
Boizard et al. 2024) and the ``dskd`` objective (Dual-Space KD with cross-model attention, Zhang et al. 2024; its
projectors are trained beside the student: ``Objective.trainable``) on the losses of
:mod:`kdbench.losses.cross_tokenizer`.

Token objectives with ``cross_tokenizer=True`` lift the shared-vocabulary check (``check_same_vocabulary``) for
themselves only. Each training example is tokenized twice — by the student's tokenizer (what the student trains
on) and by the teacher's (the same prompt and response text, the response ended by the teacher's own EOS) — and
the teacher runs on its own rows in the step; the objective receives the teacher's logits [B, Tt, Vt] and
targets [B, Tt] beside the student's [B, Ts, Vs]. ULD pairs the k-th response position of each model (its
alignment, :func:`~kdbench.losses.cross_tokenizer.rank_alignment`). The offline top-k cache is refused: it holds
the teacher's distribution at the student's positions, which a different tokenizer does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.config import option
from kdbench.errors import ConfigError, ModelError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.objectives import Batch, Objective, register_objective
from kdbench.train.params import not_negative, positive, unit_interval


def vocabulary_rows(teacher, teacher_tokenizer, student, student_tokenizer) -> tuple[int, int]:
    """(student rows, teacher rows): each model's logits used by a cross-tokenizer loss — its tokenizer's
    vocabulary (padded embedding rows beyond it are not tokens). A model with fewer output rows than its
    tokenizer has tokens is a :class:`ModelError`."""
    from kdbench.models import vocab_info

    rows = []
    for role, model, tokenizer in (("student", student, student_tokenizer), ("teacher", teacher, teacher_tokenizer)):
        info = vocab_info(model, tokenizer)
        if info.embedding_rows < info.tokenizer_size:
            raise ModelError(f"The {role} has fewer output rows ({info.embedding_rows}) than its tokenizer has tokens "
                             f"({info.tokenizer_size}); resize its embeddings or use the matching tokenizer.")
        rows.append(info.tokenizer_size)
    return rows[0], rows[1]


class CrossTokenizerDataset:
    """An :class:`~kdbench.train.data_sources.IndexedDataset`'s items plus the teacher's tokenization of the same
    example (``teacher_input_ids`` / ``teacher_labels``)."""

    def __init__(self, student_set, teacher_items: list):
        from kdbench.train.data_sources import IndexedDataset

        if len(student_set) != len(teacher_items):
            raise ValueError("the student's and the teacher's tokenizations must cover the same examples")
        self.indexed = IndexedDataset(student_set)
        self.dataset = student_set
        self.teacher_items = teacher_items

    def __len__(self) -> int:
        return len(self.indexed)

    @property
    def n_truncated(self) -> int:
        return self.dataset.n_truncated

    @property
    def n_response_tokens(self) -> int:
        return self.dataset.n_response_tokens

    def __getitem__(self, index: int) -> dict:
        item = self.indexed[index]
        teacher = self.teacher_items[index]
        return {**item, "teacher_input_ids": teacher.input_ids, "teacher_labels": teacher.labels}


class CrossTokenizerCollator:
    """:class:`~kdbench.train.data_sources.TrainCollator` for the student's rows, and the teacher's rows padded with
    the teacher's pad id into ``teacher_input_ids`` / ``teacher_labels`` / ``teacher_attention_mask`` [B, Lt]."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int):
        from kdbench.data import PadCollator
        from kdbench.train.data_sources import TrainCollator

        self.student = TrainCollator(pad_token_id)
        self.teacher = PadCollator(teacher_pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.student(features)
        teacher = self.teacher([{"input_ids": f["teacher_input_ids"], "labels": f["teacher_labels"]} for f in features])
        batch.update({f"teacher_{key}": value for key, value in teacher.items()})
        return batch


def teacher_items(examples, ends, tokenizer, *, style: str, max_prompt_length: int, max_length: int) -> list:
    """The teacher's tokenization of each (example, response end): prompt + response with the teacher's EOS."""
    from kdbench.train.responses import tokenize_response

    return [tokenize_response(e, tokenizer, style=style, max_prompt_length=max_prompt_length, max_length=max_length,
                              end=end) for e, end in zip(examples, ends)]


# ------------------------------------------------------------------------------------------ ULD
@dataclass
class ULDParams:
    """ce_weight·CE + λ·ULD (Boizard et al. 2024, Eq. 5: CE + λ·ULD)."""

    uld_weight: float = option(1.5, "lambda, the weight of the ULD term (the authors' llm-recipes distil_factor).")
    ce_weight: float = option(1.0, "Weight of CE on the gold responses (the authors' cross_entropy_factor); 0 = ULD alone.")
    temperature: float = option(1.0, "Divides both models' logits inside ULD (one tau for both).")

    def __post_init__(self):
        not_negative("uld_weight", self.uld_weight)
        not_negative("ce_weight", self.ce_weight)
        positive("temperature", self.temperature)


def _uld(batch: Batch, params: ULDParams) -> dict:
    """Σ over aligned pairs of W1 between the sorted distributions (ULD Eq. 4), plus the CE sum; the engine
    divides both by the step's counted student tokens."""
    from kdbench.losses.cross_tokenizer import uld

    teacher_mask = batch.teacher_targets != -100
    term = uld(batch.student_logits, batch.teacher_logits, batch.mask, teacher_mask, temperature=params.temperature,
               reduction="sum")
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    return {"loss": params.ce_weight * ce + params.uld_weight * term, "ce": ce, "uld": term}


register_objective(Objective("uld", "token", _uld, (ULDParams,), needs_teacher=True, dense_teacher=True,
                             cross_tokenizer=True,
                             help="Universal Logit Distillation: CE + lambda x W1 between sorted distributions, any "
                                  "two tokenizers."))


# ------------------------------------------------------------------------------------------ DSKD
@dataclass
class DSKDParams:
    """(1 − r)·CE + r·DSKD (Zhang et al. 2024, Eq. 16 with the authors' kd_rate), DSKD with cross-model attention
    (:func:`kdbench.losses.cross_tokenizer.dskd`) and projectors trained beside the student."""

    kd_rate: float = option(0.5, "r: (1-r)*CE + r*(KD in both spaces + the projector's CE) (the authors' kd_rate).")
    divergence: str = option("fkl", "The token divergence in both spaces (kdbench.losses.DIVERGENCES).")
    temperature: float = option(1.0, "Divides the logits inside the divergence of both spaces.")
    accurate_only: bool = option(True, "Student space: distil only positions whose projected teacher predicts the "
                                       "label (the authors' code).")
    teacher_space_positions: str = option("all", "Student positions the teacher space attends: all counted ones "
                                                 "(the authors' code) or those the student space kept ('kept').")
    trainable_lr: float = option(1e-3, "Learning rate of the projectors (the authors' --projector-lr).")

    def __post_init__(self):
        from kdbench.losses.divergences import get_divergence

        unit_interval("kd_rate", self.kd_rate)
        get_divergence(self.divergence)
        if self.teacher_space_positions not in ("all", "kept"):
            raise ConfigError("Parameter teacher_space_positions must be 'all' (the authors' code) or 'kept'.")
        positive("temperature", self.temperature)
        positive("trainable_lr", self.trainable_lr)


def dskd_projectors(student, teacher, params=None):
    """DSKD's trainable projectors (an ``nn.Module`` outside the student): ``query`` 2·ds → 2·dt (the student's
    [input; target] embeddings into the teacher's key space), ``t2s`` dt → ds and ``s2t`` ds → dt (the authors'
    linear projector_config)."""
    import torch

    ds = student.get_input_embeddings().weight.shape[-1]
    dt = teacher.get_input_embeddings().weight.shape[-1]
    return torch.nn.ModuleDict({"query": torch.nn.Linear(2 * ds, 2 * dt), "t2s": torch.nn.Linear(dt, ds),
                                "s2t": torch.nn.Linear(ds, dt)})


def _index_embeddings(embeddings, input_ids, targets):
    """[E(input token); E(target token)] [B, T, 2d], detached, uncounted targets read as token 0 (the authors')."""
    import torch

    counted = targets != -100
    return torch.cat([embeddings[torch.where(counted, input_ids, 0)], embeddings[torch.where(counted, targets, 0)]],
                     dim=-1).detach()


def _dskd(batch: Batch, params: DSKDParams) -> dict:
    """(1 − r)·CE sum + r·DSKD, the DSKD token mean weighted by the micro-batch's counted student tokens (the
    engine divides by the step's). Cross-model attention as in the authors' code: queries = P_query([E_s(x);
    E_s(y)]), keys = [E_t(x); E_t(y)] / std, t2s values = P_t2s(h_t / std + E_t(y) / std)."""
    from kdbench.losses.cross_tokenizer import cross_model_attention_scores, dskd

    hidden, projectors = batch.hidden, batch.module
    teacher_targets = batch.teacher_targets
    student_index = _index_embeddings(hidden["student_embeddings"], hidden["student_input_ids"], batch.targets)
    teacher_index = _index_embeddings(hidden["teacher_embeddings"], hidden["teacher_input_ids"], teacher_targets)
    teacher_target_embeddings = teacher_index[..., teacher_index.shape[-1] // 2:]
    teacher_hidden = hidden["teacher_hidden"]
    queries = projectors["query"](student_index.to(projectors["query"].weight.dtype))
    keys = (teacher_index / teacher_index.std()).to(queries.dtype)
    scores = cross_model_attention_scores(queries, keys, batch.targets != -100, teacher_targets != -100)
    t2s_inputs = teacher_hidden / teacher_hidden.std() + teacher_target_embeddings / teacher_target_embeddings.std()
    term, parts = dskd(hidden["student_hidden"], teacher_hidden, hidden["student_head"], hidden["teacher_head"],
                       batch.targets, teacher_targets, scores, t2s_projection=projectors["t2s"],
                       s2t_projection=projectors["s2t"], divergence=params.divergence,
                       temperature=params.temperature, accurate_only=params.accurate_only, return_parts=True,
                       t2s_inputs=t2s_inputs, teacher_space_positions=params.teacher_space_positions)
    counted = batch.mask.sum()
    ce = cross_entropy_sum(batch.student_logits, batch.targets)
    rate = params.kd_rate
    return {"loss": (1 - rate) * ce + rate * term * counted, "ce": ce, "dskd": term * counted,
            "kd_student_space": parts["kd_student_space"] * counted,
            "kd_teacher_space": parts["kd_teacher_space"] * counted, "ce_projector": parts["ce_projector"] * counted}


register_objective(Objective("dskd", "token", _dskd, (DSKDParams,), needs_teacher=True, dense_teacher=True,
                             cross_tokenizer=True, hidden_states=True, trainable=dskd_projectors,
                             help="Dual-Space KD with cross-model attention: KD in the student's and the teacher's "
                                  "space through trained projectors, any two tokenizers."))
