"""Fused linear + distillation loss: logits are formed chunk by chunk and never materialized.

From the student's and teacher's final hidden states and output-layer (``lm_head``) weights, each
chunk of positions computes its logits, the loss and the gradients with respect to the student's
hidden states, weight and bias; only ``chunk_rows × V`` logits exist at a time (the approach of
Liger-Kernel's ``LigerFusedLinearDistillationBase`` and TRL's ``_chunked_divergence_loss``).
The teacher is a constant (no gradient flows to it).
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError
from kdbench.losses._chunked import default_chunk_rows
from kdbench.losses._reduce import check_reduction, compute_dtype, counted_mask, counted_rows
from kdbench.losses.token import ANALYTIC_GRADIENTS, divergence_rows


def _evaluate_fused(chunk_loss, rows, chunk_rows, dtype, student_hidden, student_weight, student_bias,
                    teacher_hidden, teacher_weight, teacher_bias, labels, *, needs):
    """Σ of per-row losses over counted rows, and the unscaled gradients (hidden, weight, bias)."""
    import torch

    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    grad_hidden = torch.zeros_like(student_hidden) if need_h else None
    # The weight gradient sums over every chunk: accumulate in float32 (a bf16 running sum would round
    # at each of the many additions), cast once in backward.
    acc_dtype = torch.float64 if student_weight.dtype == torch.float64 else torch.float32
    grad_weight = torch.zeros(student_weight.shape, dtype=acc_dtype, device=student_weight.device) if need_w else None
    grad_bias = torch.zeros(student_bias.shape, dtype=acc_dtype, device=student_bias.device) if need_b else None
    total = torch.zeros((), dtype=dtype, device=student_hidden.device)
    for start in range(0, rows.numel(), chunk_rows):
        idx = rows[start:start + chunk_rows]
        h_s = student_hidden[idx]
        with torch.no_grad():
            z_t = teacher_hidden[idx] @ teacher_weight.t()
            if teacher_bias is not None:
                z_t = z_t + teacher_bias
            z_s = h_s @ student_weight.t()  # in the weight's dtype, as the model's lm_head computes it
            if student_bias is not None:
                z_s = z_s + student_bias
        label_chunk = labels[idx] if labels is not None else None
        if any_grad and getattr(chunk_loss, "value_and_grad", None) is not None:
            with torch.no_grad():  # closed-form gradient: no autograd graph over the chunk
                values, g = chunk_loss.value_and_grad(z_s.to(dtype), z_t.to(dtype), label_chunk)
                chunk_sum = values.sum()
        else:
            with torch.enable_grad():
                logits = z_s.detach().to(dtype).requires_grad_(any_grad)
                chunk_sum = chunk_loss(logits, z_t.to(dtype), label_chunk).sum()
                g = torch.autograd.grad(chunk_sum, [logits])[0] if any_grad else None
            del logits
        total += chunk_sum.detach()
        del z_s, z_t
        if g is not None:
            if need_h:
                grad_hidden[idx] = (g.to(student_weight.dtype) @ student_weight).to(grad_hidden.dtype)
            if need_w:
                grad_weight.addmm_(g.t().to(acc_dtype), h_s.to(acc_dtype))
            if need_b:
                grad_bias.add_(g.sum(0).to(acc_dtype))
    return total, (grad_hidden, grad_weight, grad_bias)


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
            total, grads = _evaluate_fused(*args, needs=needs)
            ctx.grads = grads
            ctx.args = args  # inputs are kept alive by the graph anyway; needed only for a repeated backward
            ctx.needs = needs
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grads = ctx.grads
            ctx.grads = None
            if grads is None:  # a repeated backward through a retained graph: recompute
                _, grads = _evaluate_fused(*ctx.args, needs=ctx.needs)
            grad_hidden, grad_weight, grad_bias = grads
            student_weight, student_bias = ctx.args[5], ctx.args[6]
            scale = grad_out.to(torch.float64 if grad_out.dtype == torch.float64 else torch.float32)
            if grad_hidden is not None:
                grad_hidden = (grad_hidden.mul_(scale) if grad_hidden.dtype == scale.dtype
                               else (grad_hidden.to(scale.dtype) * scale).to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight = grad_weight.mul_(scale).to(student_weight.dtype)
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
    ``divergence``: a name of :data:`kdbench.losses.DIVERGENCES` with its ``**params``.
    ``reduction``: "mean" over counted positions or "sum" (→ scalar; per-position values would need
    the full-vocabulary gradient, so "none" is not offered). Gradients reach the student's hidden
    states, weight and bias; the weight gradient is accumulated in float32 ([V, H_s] float32).
    Equals the logits path on ``hidden @ weight.T + bias`` computed in the weight's dtype.
    """
    import torch

    global _FUNCTION
    check_reduction(reduction, ("mean", "sum"))
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (got {temperature}).")
    rows_impl, row_params = divergence_rows(divergence, **params)
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
        log_q = torch.log_softmax(student_logits / tau, dim=-1)
        log_p = torch.log_softmax(teacher_logits / tau, dim=-1)
        values = (divergence_weight * scale) * rows_impl(log_p, log_q, row_params, False)
        if ce_weight:
            log_q1 = log_q if tau == 1.0 else torch.log_softmax(student_logits, dim=-1)
            values = values - ce_weight * log_q1.gather(-1, label_chunk.unsqueeze(-1)).squeeze(-1)
        return values

    closed_form = ANALYTIC_GRADIENTS.get(rows_impl)
    if closed_form is not None:
        def value_and_grad(student_logits, teacher_logits, label_chunk):
            log_q = torch.log_softmax(student_logits / tau, dim=-1)
            log_p = torch.log_softmax(teacher_logits / tau, dim=-1)
            values, grad = closed_form(log_p, log_q, row_params)
            weight = divergence_weight * scale
            values, grad = weight * values, grad.mul_(weight / tau)
            if ce_weight:  # ∂(−log softmax(z)[y])/∂z = softmax(z) − onehot(y)
                log_q1 = log_q if tau == 1.0 else torch.log_softmax(student_logits, dim=-1)
                target = label_chunk.unsqueeze(-1)
                values = values - ce_weight * log_q1.gather(-1, target).squeeze(-1)
                grad.add_(log_q1.exp(), alpha=ce_weight)
                grad.scatter_add_(-1, target, torch.full(target.shape, -float(ce_weight), dtype=grad.dtype,
                                                         device=grad.device))
            return values, grad

        chunk_loss.value_and_grad = value_and_grad

    if _FUNCTION is None:
        _FUNCTION = _make_function()
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab_size)
    total = _FUNCTION.apply(chunk_loss, rows, max(int(chunk), 1), dtype,
                            student_hidden.reshape(n_rows, -1), student_weight, student_bias,
                            teacher_hidden.reshape(n_rows, -1).detach(), teacher_weight.detach(),
                            teacher_bias.detach() if teacher_bias is not None else None, labels_flat)
    if reduction == "sum":
        return total
    return total / max(rows.numel(), 1)
