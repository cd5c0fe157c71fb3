"""Masking and reduction shared by every loss in :mod:`kdbench.losses`.

Token-level convention (METHODS.md, Conventions): ``mean`` is the mean over the counted positions of
the batch, ``sum`` their sum (a trainer divides it by the token count of the whole optimizer step),
``none`` returns the per-position values with zeros at positions that do not count.
"""

from __future__ import annotations

from kdbench.errors import ConfigError, DataError

TOKEN_REDUCTIONS = ("mean", "sum", "none")
SEQUENCE_REDUCTIONS = ("mean", "none")


def check_reduction(reduction: str, allowed: tuple[str, ...] = TOKEN_REDUCTIONS) -> None:
    """Raise :class:`ConfigError` unless ``reduction`` is one of ``allowed``."""
    if reduction not in allowed:
        raise ConfigError(f"reduction must be one of {', '.join(allowed)} (got {reduction!r}).")


def compute_dtype(*tensors):
    """float64 when any input is float64 (exact tests), else float32 (bf16/fp16 are upcast)."""
    import torch

    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def counted_mask(mask, batch_shape):
    """Boolean [B, T] mask of the positions that count; ``None`` means every position counts.

    Any nonzero entry counts (the mask is a selector, not a weight).
    """
    import torch

    if mask is None:
        return None
    if tuple(mask.shape) != tuple(batch_shape):
        raise DataError(f"mask has shape {tuple(mask.shape)} but the logits have positions {tuple(batch_shape)}; "
                        "pass a [B, T] mask matching the logits.")
    return mask != 0 if mask.dtype != torch.bool else mask


def counted_rows(mask_bool, n_rows: int, device):
    """Flat indices (long [n]) of the counted rows of a [B*T, ...] view."""
    import torch

    if mask_bool is None:
        return torch.arange(n_rows, device=device)
    return mask_bool.reshape(-1).nonzero().squeeze(1)


def reduce_positions(per_position, mask_bool, reduction: str):
    """Reduce per-position values [B, T] (already zero where uncounted) by ``reduction``.

    ``mean`` over zero counted positions is 0 (with a zero gradient), not NaN, as in TRL.
    """
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = per_position.numel() if mask_bool is None else int(mask_bool.sum())
    return total / max(count, 1)


def reduce_pairs(per_pair, reduction: str):
    """Reduce per-pair losses [B] by ``mean`` or ``none``."""
    check_reduction(reduction, SEQUENCE_REDUCTIONS)
    return per_pair if reduction == "none" else per_pair.mean()
