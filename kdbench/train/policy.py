"""Preparing the trained policy of preference and guided training: dropout off by default.

The frozen models (references, teachers) always run in eval mode, but a policy loaded from a
pretrained checkpoint trains with the checkpoint's dropout (GPT-2 ships 0.1): its log-probs then carry
dropout noise that the reference's do not, so at the first step policy = reference no longer gives a
log-ratio of 0, and the implicit rewards and margins are noisy. TRL disables it in its DPO-family
trainers (``disable_dropout=True``, ``trl.trainer.utils.disable_dropout_in_model``); kdbench does the
same with the recipe parameter ``disable_dropout`` (default ``true``; ``false`` keeps the checkpoint's).
"""

from __future__ import annotations

#: Float dropout rates some architectures read in ``forward`` instead of an ``nn.Dropout`` module
#: (Llama / Qwen2 / Mistral attention: ``attention_dropout``).
FLOAT_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout")


def disable_dropout(model) -> int:
    """Set every dropout probability of ``model`` to 0 in place: each ``torch.nn.Dropout``'s ``p`` and
    the float rates of :data:`FLOAT_DROPOUT_ATTRIBUTES`. The checkpoint's config is left as it is.
    Returns the number of non-zero rates that were turned off."""
    import torch

    turned_off = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            turned_off += module.p > 0
            module.p = 0.0
            continue
        for name in FLOAT_DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float):
                turned_off += value > 0
                setattr(module, name, 0.0)
    return turned_off
