"""Token-level KD across tokenizers on the token trainer: the ``uld`` objective (Universal Logit Distillation,
Boizard et al. 2024) on the losses of :mod:`kdbench.losses.cross_tokenizer`.

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
from kdbench.errors import ModelError
from kdbench.losses.sequence import cross_entropy_sum
from kdbench.train.objectives import Batch, Objective, register_objective
from kdbench.train.params import not_negative, positive


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
