"""Tensors inside a sampling form's state, as JSON.

The engine saves a sampling form's ``state_dict()`` as JSON in every checkpoint
(:mod:`kdbench.train.trainer_base`). The rollout and replay buffers (:mod:`kdbench.train.rollouts`,
:mod:`kdbench.train.replay`) keep torch tensors (stored rows, generator states); :func:`encode` turns every
tensor of a nested structure into ``{"__tensor__": values, "dtype": name, "shape": [...]}`` and :func:`decode`
restores it. Float32/float64 values round-trip bit-exactly (JSON writes Python floats with ``repr``), so a
resumed run continues with the very buffers an uninterrupted one holds.
"""

from __future__ import annotations

TENSOR_KEY = "__tensor__"


def encode(value):
    """``value`` with every tensor replaced by a JSON-serialisable record (lists, dicts and tuples walked)."""
    import torch

    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().reshape(-1)
        return {TENSOR_KEY: flat.tolist(), "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def decode(value):
    """The inverse of :func:`encode`."""
    import torch

    if isinstance(value, dict):
        if TENSOR_KEY in value:
            dtype = getattr(torch, value["dtype"])
            return torch.tensor(value[TENSOR_KEY], dtype=dtype).reshape(value["shape"])
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value
