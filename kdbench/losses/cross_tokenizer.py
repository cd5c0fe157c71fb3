"""Token-level distillation across tokenizers: ULD (Boizard et al. 2024) and DSKD (Zhang et al. 2024).

Teacher and student tokenize the same text differently, so their positions and vocabularies differ.
Two alignments of positions are offered:

* :func:`rank_alignment`: ULD's — the i-th counted (response) position of the student with the i-th
  of the teacher, truncated to the shorter response (the authors' code aligns the first answer token
  and pads to the right).
* :func:`prefix_alignment`: from the tokenizers' character offsets, the positions where both models
  have read exactly the same text (a student token and a teacher token start at the same character), so
  both distributions are conditioned on one prefix. :func:`alignment_scores_from_pairs` turns it into
  the hard attention scores that :func:`dskd` accepts in place of its learned cross-model attention.

Shapes: logits [B, T, V] with position t predicting the label at t (as elsewhere in
:mod:`kdbench.losses`); masks [B, T]; T and V differ between student (s) and teacher (t).
"""

from __future__ import annotations

import math
from typing import Callable

from kdbench.errors import ConfigError, DataError
from kdbench.losses.chunking import rowwise_loss
from kdbench.losses.reduction import check_reduction, compute_dtype
from kdbench.losses.token import divergence_loss

# ------------------------------------------------------------------ alignment of positions


def rank_alignment(student_mask, teacher_mask):
    """ULD's alignment: pairs (b, i_s, i_t) of the k-th counted student and k-th counted teacher position of
    row b, k < min(n_s(b), n_t(b)). ``student_mask`` [B, Ts], ``teacher_mask`` [B, Tt] →
    (batch_index, student_position, teacher_position), each long [n], ordered by row then k."""
    import torch

    if student_mask.shape[0] != teacher_mask.shape[0]:
        raise DataError(f"student and teacher batches differ ({student_mask.shape[0]} and "
                        f"{teacher_mask.shape[0]} rows).")
    batch, s_pos, t_pos = [], [], []
    for b in range(student_mask.shape[0]):
        s_idx = (student_mask[b] != 0).nonzero().squeeze(1)
        t_idx = (teacher_mask[b] != 0).nonzero().squeeze(1)
        n = min(s_idx.numel(), t_idx.numel())
        batch.append(torch.full((n,), b, dtype=torch.long, device=student_mask.device))
        s_pos.append(s_idx[:n])
        t_pos.append(t_idx[:n].to(student_mask.device))
    return torch.cat(batch), torch.cat(s_pos), torch.cat(t_pos)


def token_offsets(tokenizer, text: str):
    """(input_ids, [(start, end), ...]) of ``text`` without special tokens, from a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer (no character offsets); load it with "
                          "use_fast=True to align positions across tokenizers.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]]


def prefix_alignment(student_offsets, teacher_offsets):
    """Pairs (j, k) of a student token j and a teacher token k that start at the same character of the text.

    Offsets are each tokenizer's [(start, end), ...] over one text (:func:`token_offsets`). Before token
    j the student has read text[:start_j], before token k the teacher text[:start_k]: equal starts mean
    both predict the next token from the same prefix. A token sharing its start with the previous one
    (byte-level pieces of one character) is skipped: only the first token starting at a character is
    a boundary. → list of (student_token_index, teacher_token_index), increasing in both; the logits
    position predicting token j is (j's position in the model's input) − 1.
    """
    def first_starts(offsets):
        starts, previous_end = {}, 0
        for index, (start, end) in enumerate(offsets):
            # the byte pieces of one character split over several tokens repeat its span: not a boundary
            if start not in starts and start >= previous_end:
                starts[start] = index
            previous_end = max(previous_end, end)
        return starts

    student_starts, teacher_starts = first_starts(student_offsets), first_starts(teacher_offsets)
    return [(student_starts[c], teacher_starts[c]) for c in sorted(student_starts) if c in teacher_starts]


def alignment_scores_from_pairs(pairs_per_row, student_length: int, teacher_length: int, *, dtype=None):
    """Hard attention scores [B, Ts, Tt]: 0 at each aligned (student position, teacher position) pair of
    ``pairs_per_row`` (one list of pairs per row, positions of the logits), −inf elsewhere."""
    import torch

    scores = torch.full((len(pairs_per_row), student_length, teacher_length), -math.inf, dtype=dtype or torch.float32)
    for b, pairs in enumerate(pairs_per_row):
        for s, t in pairs:
            if not (0 <= s < student_length and 0 <= t < teacher_length):
                raise DataError(f"aligned pair ({s}, {t}) lies outside the {student_length} student and "
                                f"{teacher_length} teacher positions.")
            scores[b, s, t] = 0.0
    return scores


# ------------------------------------------------------------------ ULD


def _uld_rows(student_chunk, teacher_chunk, tau, dtype):
    """Σ_i |sort↓(q)_i − sort↓(p)_i| per row, the shorter vocabulary padded with zero probabilities."""
    import torch
    import torch.nn.functional as F

    q = torch.softmax(student_chunk.to(dtype) / tau, dim=-1).sort(dim=-1, descending=True).values
    p = torch.softmax(teacher_chunk.to(dtype) / tau, dim=-1).sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def uld(student_logits, teacher_logits, student_mask, teacher_mask, *, temperature=1.0, reduction="mean",
        chunk_rows=None):
    """Universal Logit Distillation (Boizard et al. 2024, Eq. 4): at each aligned pair of positions,
    W1 between the two distributions with their tokens ranked by probability = Σ_i |sort↓(q)_i − sort↓(p)_i|.

    Positions are paired by :func:`rank_alignment` of ``student_mask`` [B, Ts] and ``teacher_mask``
    [B, Tt]. ``student_logits`` [B, Ts, Vs], ``teacher_logits`` [B, Tt, Vt] (any Vs, Vt), both divided by
    ``temperature``. ``reduction``: "mean" over aligned pairs (the step's token mean; 0 with no pair),
    "sum", or "none" → [B, Ts] on the student's aligned positions (0 elsewhere). Add the student's CE with
    the paper's weight λ in the recipe.
    """
    import torch

    check_reduction(reduction)
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise DataError("ULD needs student and teacher logits of shape [B, T, V].")
    batch, s_pos, t_pos = rank_alignment(student_mask, teacher_mask)
    dtype = compute_dtype(student_logits, teacher_logits)
    student_rows = student_logits[batch, s_pos]  # [n, Vs]: one copy of the aligned rows only
    teacher_rows = teacher_logits[batch, t_pos.to(teacher_logits.device)]
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    chunk = chunk_rows if chunk_rows is not None else max(1, 2**20 // width)
    tau = float(temperature)
    per_pair = rowwise_loss(lambda s, t: _uld_rows(s, t, tau, dtype), [student_rows, teacher_rows],
                            torch.arange(batch.numel(), device=student_logits.device), chunk, dtype)
    if reduction == "none":
        out = torch.zeros(student_logits.shape[:2], dtype=dtype, device=student_logits.device)
        return out.index_put((batch, s_pos), per_pair)
    total = per_pair.sum()
    return total if reduction == "sum" else total / max(batch.numel(), 1)


# ------------------------------------------------------------------ DSKD


def cross_model_attention_scores(student_queries, teacher_keys, student_mask=None, teacher_mask=None):
    """DSKD's cross-model attention logits (Zhang et al. 2024, §3.3): Q·Kᵀ/√d, −inf at masked teacher keys.

    ``student_queries`` [B, Ts, d] (the paper: projected student embeddings of the input and target
    tokens), ``teacher_keys`` [B, Tt, d]; masks [B, Ts] / [B, Tt] → scores [B, Ts, Tt] (rows of
    uncounted student positions are all −inf)."""
    scores = student_queries @ teacher_keys.transpose(-1, -2) / math.sqrt(student_queries.shape[-1])
    if teacher_mask is not None:
        scores = scores.masked_fill(~(teacher_mask != 0).unsqueeze(1), -math.inf)
    if student_mask is not None:
        scores = scores.masked_fill(~(student_mask != 0).unsqueeze(2), -math.inf)
    return scores


def _attend(scores, values):
    """softmax(scores) @ values over the last dim of ``scores``; all −inf rows give 0 and are reported False."""
    import torch

    has_key = ~torch.isneginf(scores).all(-1)
    weights = torch.softmax(scores.masked_fill(~has_key.unsqueeze(-1), 0.0), dim=-1) * has_key.unsqueeze(-1)
    return weights @ values, has_key


def dskd(student_hidden, teacher_hidden, student_head, teacher_head, student_labels, teacher_labels,
         alignment_scores, *, t2s_projection: Callable, s2t_projection: Callable, divergence="fkl",
         temperature=1.0, accurate_only=True, return_parts=False, chunk_rows=None, t2s_inputs=None,
         teacher_space_positions="kept"):
    """Dual-Space KD with cross-model attention (Zhang et al. 2024, Eqs. 6–15), one alignment for both spaces.

    Student space: teacher hidden states are projected (``t2s_projection``: [..., dt] → [..., ds]),
    attended to student positions by softmax_Tt(``alignment_scores``) and read out by the student's head
    (detached): logits z_t2s [B, Ts, Vs]; the student distilled from softmax(z_t2s) (detached) by
    ``divergence``, and CE(z_t2s, student labels) trains the projector. Teacher space: student hidden
    states projected (``s2t_projection``: ds → dt), attended to teacher positions by softmax over Ts of
    the transposed scores, read out by the teacher's head (frozen): logits z_s2t [B, Tt, Vt], distilled
    from the teacher's own distribution. ``accurate_only`` keeps, in the student space, only positions
    whose z_t2s predicts the label (the authors' code), and in the teacher space the teacher positions
    attending to them.

    Shapes: student_hidden [B, Ts, ds], teacher_hidden [B, Tt, dt], student_head [Vs, ds] and
    teacher_head [Vt, dt] (LM-head weights), labels [B, Ts] / [B, Tt] (−100 = uncounted),
    alignment_scores [B, Ts, Tt] (:func:`cross_model_attention_scores` or
    :func:`alignment_scores_from_pairs`; −inf = not aligned). Each term is a token mean over its counted
    positions. ``t2s_inputs`` [B, Tt, dt]: what ``t2s_projection`` reads in place of the teacher hidden states
    (the authors' code: the normalised hidden states plus the normalised target-token embeddings).
    ``teacher_space_positions``: "kept" — the teacher space attends only the student positions the student
    space kept (``accurate_only``); "all" — every counted student position (the authors' code gates the student
    space only). → scalar
    kd_student_space + kd_teacher_space + ce_projector (with the parts if asked).
    """
    import torch
    import torch.nn.functional as F

    batch_size, student_length, _ = student_hidden.shape
    teacher_length = teacher_hidden.shape[1]
    if tuple(alignment_scores.shape) != (batch_size, student_length, teacher_length):
        raise DataError(f"alignment scores {tuple(alignment_scores.shape)} must be [B, Ts, Tt] = "
                        f"{(batch_size, student_length, teacher_length)}.")
    if tuple(student_labels.shape) != (batch_size, student_length) or \
            tuple(teacher_labels.shape) != (batch_size, teacher_length):
        raise DataError("student and teacher labels must be [B, Ts] and [B, Tt], matching the hidden states.")
    student_counted, teacher_counted = student_labels != -100, teacher_labels != -100
    scores = alignment_scores.masked_fill(~teacher_counted.unsqueeze(1), -math.inf)
    scores = scores.masked_fill(~student_counted.unsqueeze(2), -math.inf)

    student_logits = student_hidden @ student_head.transpose(0, 1)
    with torch.no_grad():
        teacher_logits = teacher_hidden.detach() @ teacher_head.detach().transpose(0, 1)

    # student space (Eqs. 11-13): the projected teacher read out by the student's own head, held fixed
    t2s_source = teacher_hidden if t2s_inputs is None else t2s_inputs
    t2s_hidden, student_has_key = _attend(scores, t2s_projection(t2s_source.detach()))
    t2s_logits = t2s_hidden @ student_head.detach().transpose(0, 1)
    ce_mask = student_counted & student_has_key
    ce_projector = F.cross_entropy(t2s_logits[ce_mask], student_labels[ce_mask], reduction="sum") / max(
        int(ce_mask.sum()), 1)
    student_mask = ce_mask
    if accurate_only:
        student_mask = ce_mask & (t2s_logits.detach().argmax(-1) == student_labels)
    kd_student = divergence_loss(divergence, student_logits, t2s_logits.detach(), student_mask,
                                 temperature=temperature, chunk_rows=chunk_rows)

    # teacher space (Eqs. 14-15): the projected student read out by the frozen teacher head
    if teacher_space_positions not in ("kept", "all"):
        raise ConfigError(f"teacher_space_positions must be 'kept' or 'all' (got {teacher_space_positions!r}).")
    attended = student_mask if teacher_space_positions == "kept" else ce_mask
    transposed = scores.transpose(1, 2).masked_fill(~attended.unsqueeze(1), -math.inf)
    s2t_hidden, teacher_has_key = _attend(transposed, s2t_projection(student_hidden))
    s2t_logits = s2t_hidden @ teacher_head.detach().transpose(0, 1)
    teacher_mask = teacher_counted & teacher_has_key
    kd_teacher = divergence_loss(divergence, s2t_logits, teacher_logits, teacher_mask, temperature=temperature,
                                 chunk_rows=chunk_rows)
    loss = kd_student + kd_teacher + ce_projector
    if return_parts:
        return loss, {"kd_student_space": kd_student, "kd_teacher_space": kd_teacher, "ce_projector": ce_projector,
                      "student_positions": int(student_mask.sum()), "teacher_positions": int(teacher_mask.sum())}
    return loss
