"""Fused linear + distillation loss: logits are formed chunk by chunk and never materialized.

From the student's and teacher's final hidden states and output-layer (``lm_head``) weights, each
block of positions computes its logits, the loss and the gradients with respect to the student's
hidden states, weight and bias; only ``block_rows × V`` logits exist at a time (the approach of
Liger-Kernel's ``LigerFusedLinearDistillationBase`` and TRL's ``_chunked_divergence_loss``).
The teacher is a constant (no gradient flows to it).

Memory and time, per block (:func:`_evaluate_blocked`): the logits come from one matmul per model
in the weights' dtype; the loss math runs on cache-sized float32 sub-chunks; the logits gradient G
overwrites the student logits in the weights' dtype (what the logits path's autograd stores too),
so each block needs two logits buffers; ∂L/∂h = G W and ∂L/∂W += Gᵀ h are one matmul each. The
weight gradient is summed over blocks in float32 (float64 for float64 weights) — rounding a bf16
running sum at every block would lose precision — held as a list of ≤ 64 MiB vocabulary slices,
and cast to the weights' dtype slice by slice in backward, each float32 slice freed as soon as it is
cast: the peak holds the float32 sum plus one slice, never the float32 sum and the whole cast copy.
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses.reduction import check_reduction, compute_dtype, counted_mask, counted_rows
from kdbench.losses.divergences import get_divergence
from kdbench.losses.token import scale_logits


#: Elements of one block of logits (rows × vocabulary) formed by one matmul: 2**23 = 16 MiB in bf16.
BLOCK_ELEMENTS = 2**23
#: Rows per block at least this many, so the [V, H] weight-gradient accumulator is swept rarely.
MIN_BLOCK_ROWS = 128
#: Elements of one float32 temporary of the loss math: 2**19 = 2 MiB, about the size of a core's L2.
MATH_ELEMENTS = 2**19
#: Bytes of one block of the float32 weight-gradient accumulator, at most (blocks are equal): 64 MiB.
#: Blocks above glibc's largest dynamic mmap threshold (32 MiB) are each their own mapping, so freeing
#: one returns its memory at once and does not raise the threshold (which would move later
#: chunk-sized temporaries onto the fragmenting heap).
ACCUMULATOR_BLOCK_BYTES = 2**26


def default_block_rows(vocab_size: int) -> int:
    """Rows of logits formed per matmul: about :data:`BLOCK_ELEMENTS` elements, at least 128 rows."""
    return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(int(vocab_size), 1))


def _vocab_blocks(vocab_size: int, width: int, element_size: int):
    """[(start, stop)] equal slices of the vocabulary, each an accumulator block of ≤ 64 MiB."""
    n_blocks = max(1, -(-vocab_size * width * element_size // ACCUMULATOR_BLOCK_BYTES))
    rows = -(-vocab_size // n_blocks)
    return [(start, min(start + rows, vocab_size)) for start in range(0, vocab_size, rows)]


def _evaluate_blocked(chunk_loss, rows, block_rows, dtype, student_hidden, student_weight, student_bias,
                      teacher_hidden, teacher_weight, teacher_bias, labels, *, needs):
    """Σ of per-row losses over counted rows, and the unscaled gradients (hidden, weight blocks, bias).

    Per block of ``block_rows`` counted rows: both models' logits z [n, V] by one matmul each, in
    the weights' dtype (as the model's ``lm_head`` computes them); the loss math over sub-chunks of
    ``MATH_ELEMENTS`` elements upcast to ``dtype``; each sub-chunk's gradient ∂L/∂z_s overwrites its
    student logits, rounded to the weights' dtype as the logits path's gradient is. Then
    ∂L/∂h = G W (one matmul) and ∂L/∂W += Gᵀ h in float32 (float64 for float64): the weight gradient
    is a list of float32 vocabulary blocks, cast and freed one by one in backward.
    """
    import torch

    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    vocab_size, width = student_weight.shape
    acc_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    grad_hidden = torch.zeros_like(student_hidden) if need_h else None
    blocks = _vocab_blocks(vocab_size, width, torch.empty((), dtype=acc_dtype).element_size())
    grad_weight = ([torch.zeros((stop - start, width), dtype=acc_dtype, device=student_weight.device)
                    for start, stop in blocks] if need_w else None)
    grad_bias = torch.zeros(student_bias.shape, dtype=acc_dtype, device=student_bias.device) if need_b else None
    total = torch.zeros((), dtype=dtype, device=student_hidden.device)
    math_rows = max(1, MATH_ELEMENTS // max(vocab_size, 1))
    value_and_grad = getattr(chunk_loss, "value_and_grad", None) if any_grad else None
    for start in range(0, rows.numel(), block_rows):
        idx = rows[start:start + block_rows]
        h_s = student_hidden[idx]
        with torch.no_grad():
            z_t = teacher_hidden[idx] @ teacher_weight.t()
            if teacher_bias is not None:
                z_t = z_t + teacher_bias
            z_s = h_s.detach() @ student_weight.t()
            if student_bias is not None:
                z_s = z_s + student_bias
        label_block = labels[idx] if labels is not None else None
        for sub in range(0, idx.numel(), math_rows):
            part = slice(sub, sub + math_rows)
            label_chunk = label_block[part] if label_block is not None else None
            if value_and_grad is not None:
                with torch.no_grad():  # closed-form gradient: no autograd graph over the chunk
                    values, g = value_and_grad(z_s[part], z_t[part], label_chunk)
            else:
                with torch.enable_grad():
                    logits = z_s[part].detach().to(dtype).requires_grad_(any_grad)
                    values = chunk_loss(logits, z_t[part].to(dtype), label_chunk)
                    g = torch.autograd.grad(values.sum(), [logits])[0] if any_grad else None
                del logits
            total += values.detach().sum()
            if g is not None:
                z_s[part] = g  # the logits are no longer needed: G takes their place
            del values, g
        del z_t
        if not any_grad:
            continue
        grad_logits = z_s.to(student_weight.dtype)
        del z_s
        if need_h:
            grad_hidden[idx] = (grad_logits @ student_weight).to(grad_hidden.dtype)
        if need_w:
            h_acc = h_s.detach().to(acc_dtype)
            for (lo, hi), accumulator in zip(blocks, grad_weight):
                accumulator.addmm_(grad_logits[:, lo:hi].t().to(acc_dtype), h_acc)
        if need_b:
            grad_bias.add_(grad_logits.sum(0, dtype=acc_dtype))
        del grad_logits
    return total, (grad_hidden, grad_weight, grad_bias)


def _weight_gradient(blocks, scale, weight):
    """The [V, H] weight gradient in the weight's dtype from the float32 blocks, freeing each as it goes."""
    import torch

    if len(blocks) == 1 and blocks[0].dtype == weight.dtype:
        return blocks.pop().mul_(scale)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    start = 0
    while blocks:
        block = blocks.pop(0).mul_(scale)
        out[start:start + block.shape[0]] = block
        start += block.shape[0]
        del block
    return out


def _make_function():
    import torch

    class FusedLinearDistillation(torch.autograd.Function):
        """Σ over counted rows of the per-row loss; gradients formed in forward, scaled in backward."""

        @staticmethod
        def forward(ctx, chunk_loss, rows, chunk_rows, dtype, student_hidden, student_weight, student_bias,
                    teacher_hidden, teacher_weight, teacher_bias, labels):
            needs = (ctx.needs_input_grad[4], ctx.needs_input_grad[5],
                     ctx.needs_input_grad[6] and student_bias is not None)
            args = (chunk_loss, rows, chunk_rows, dtype, student_hidden, student_weight, student_bias,
                    teacher_hidden, teacher_weight, teacher_bias, labels)
            total, grads = _evaluate_blocked(*args, needs=needs)
            ctx.grads = grads
            ctx.args = args  # inputs are kept alive by the graph anyway; needed only for a repeated backward
            ctx.needs = needs
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grads = ctx.grads
            ctx.grads = None
            if grads is None:  # a repeated backward through a retained graph: recompute
                _, grads = _evaluate_blocked(*ctx.args, needs=ctx.needs)
            grad_hidden, grad_weight, grad_bias = grads
            student_weight, student_bias = ctx.args[5], ctx.args[6]
            scale = grad_out.to(torch.float64 if grad_out.dtype == torch.float64 else torch.float32)
            if grad_hidden is not None:
                grad_hidden = (grad_hidden.mul_(scale) if grad_hidden.dtype == scale.dtype
                               else (grad_hidden.to(scale.dtype) * scale).to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight = _weight_gradient(grad_weight, scale, student_weight)
            if grad_bias is not None:
                grad_bias = grad_bias.mul_(scale).to(student_bias.dtype)
            return (None, None, None, None, grad_hidden, grad_weight, grad_bias, None, None, None, None)

    return FusedLinearDistillation


_FUNCTION = None


def fused_token_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, *,
                     divergence="fkl", temperature=1.0, reduction="mean", student_bias=None, teacher_bias=None,
                     labels=None, ce_weight=0.0, divergence_weight=1.0, scale_by_temperature_squared=False,
                     chunk_rows=None, **params):
    """divergence_weight·D(p ‖ q) + ce_weight·CE(labels), logits computed per chunk of positions.

    Shapes: ``student_hidden`` [B, T, H_s], ``student_weight`` [V, H_s] (the student's ``lm_head``),
    ``teacher_hidden`` [B, T, H_t], ``teacher_weight`` [V, H_t], biases [V] or None, ``mask`` [B, T],
    ``labels`` [B, T] (needed when ``ce_weight`` ≠ 0; CE is taken at temperature 1).
    ``divergence``: a registered divergence (:mod:`kdbench.losses.divergences`) with its ``**params``.
    ``reduction``: "mean" over counted positions or "sum" (→ scalar; per-position values would need
    the full-vocabulary gradient, so "none" is not offered). Gradients reach the student's hidden
    states, weight and bias; the weight gradient is accumulated in float32 over blocks ([V, H_s]
    float32 in ≤ 64 MiB slices) and rounded once to the weight's dtype. ``chunk_rows``: positions per
    block (default :func:`default_block_rows`: ~2**23 logits, at least 128 rows).
    Equals the logits path on ``hidden @ weight.T + bias`` computed in the weight's dtype.
    """
    import torch

    global _FUNCTION
    check_reduction(reduction, ("mean", "sum"))
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")
    record = get_divergence(divergence)
    rows_impl, row_params = record.rows, record.resolve(**params)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise DataError(f"student vocabulary {student_weight.shape[0]} and teacher vocabulary "
                        f"{teacher_weight.shape[0]} differ; trim padded vocabulary rows so both match.")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise DataError(f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
                        f"{tuple(teacher_hidden.shape)} must cover the same [B, T] positions.")
    if ce_weight and labels is None:
        raise ConfigError("ce_weight is nonzero but no labels were given; pass labels [B, T].")
    batch_shape = tuple(student_hidden.shape[:2])
    n_rows = batch_shape[0] * batch_shape[1]
    vocab_size = student_weight.shape[0]
    mask_bool = counted_mask(mask, batch_shape)
    rows = counted_rows(mask_bool, n_rows, student_hidden.device)
    labels_flat = None
    if labels is not None:
        labels_flat = labels.reshape(n_rows).long()
        counted_labels = labels_flat.index_select(0, rows)
        if ce_weight and counted_labels.numel() and (int(counted_labels.min()) < 0
                                                     or int(counted_labels.max()) >= vocab_size):
            raise DataError(f"a counted position has a label outside [0, {vocab_size}); mask it out.")
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    tau = float(temperature)
    scale = tau * tau if scale_by_temperature_squared else 1.0

    def chunk_loss(student_logits, teacher_logits, label_chunk):
        log_q = torch.log_softmax(scale_logits(student_logits, dtype, tau), dim=-1)
        log_p = torch.log_softmax(scale_logits(teacher_logits, dtype, tau), dim=-1)
        values = (divergence_weight * scale) * rows_impl(log_p, log_q, row_params, False)
        if ce_weight:
            log_q1 = log_q if tau == 1.0 else torch.log_softmax(student_logits.to(dtype), dim=-1)
            values = values - ce_weight * log_q1.gather(-1, label_chunk.unsqueeze(-1)).squeeze(-1)
        return values

    closed_form = record.analytic
    if closed_form is not None:
        def value_and_grad(student_logits, teacher_logits, label_chunk):
            log_q = torch.log_softmax(scale_logits(student_logits, dtype, tau), dim=-1)
            log_p = torch.log_softmax(scale_logits(teacher_logits, dtype, tau), dim=-1)
            values, grad = closed_form(log_p, log_q, row_params)
            del log_p
            weight = divergence_weight * scale
            values = values if weight == 1.0 else weight * values
            grad = grad if weight / tau == 1.0 else grad.mul_(weight / tau)
            if ce_weight:  # ∂(−log softmax(z)[y])/∂z = softmax(z) − onehot(y)
                log_q1 = log_q if tau == 1.0 else torch.log_softmax(student_logits.to(dtype), dim=-1)
                target = label_chunk.unsqueeze(-1)
                values = values - ce_weight * log_q1.gather(-1, target).squeeze(-1)
                grad.add_(log_q1.exp(), alpha=ce_weight)
                grad.scatter_add_(-1, target, torch.full(target.shape, -float(ce_weight), dtype=grad.dtype,
                                                         device=grad.device))
            return values, grad

        chunk_loss.value_and_grad = value_and_grad

    if _FUNCTION is None:
        _FUNCTION = _make_function()
    chunk = chunk_rows if chunk_rows is not None else default_block_rows(vocab_size)
    total = _FUNCTION.apply(chunk_loss, rows, max(int(chunk), 1), dtype,
                            student_hidden.reshape(n_rows, -1), student_weight, student_bias,
                            teacher_hidden.reshape(n_rows, -1).detach(), teacher_weight.detach(),
                            teacher_bias.detach() if teacher_bias is not None else None, labels_flat)
    if reduction == "sum":
        return total
    return total / max(rows.numel(), 1)
