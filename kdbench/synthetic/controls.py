"""Meaningless teachers for the embedded benchmark's negative controls.

A negative control checks that the benchmark does not reward what carries no information: KD against
a teacher whose knowledge has been destroyed must not beat SFT. The teachers are built outside the
methods (the KD recipe trains against them as against any teacher), cached like the real one:

* ``permuted``: the trained teacher with its output distribution permuted over the vocabulary — the
  logit of token v becomes the trained logit of π(v) for a fixed random permutation π of the ordinary
  tokens (special tokens keep theirs, so responses still end). Its confidence, entropy and
  calibration are the real teacher's; only the meaning is gone.
* ``untrained``: a freshly initialised model of the teacher's size.
"""

from __future__ import annotations

from pathlib import Path

from kdbench.errors import ConfigError
from kdbench.store import ArtifactStore

TEACHER_CONTROLS = ("permuted", "untrained")


def permutation(vocab_size: int, fixed: set[int], seed: int) -> list[int]:
    """π as a list (``π[v]`` = the trained token whose logit token v receives): a random permutation of
    the ids not in ``fixed``, the identity on ``fixed``."""
    import random

    movable = [v for v in range(vocab_size) if v not in fixed]
    shuffled = movable[:]
    random.Random(f"permuted-teacher-{seed}").shuffle(shuffled)
    mapping = list(range(vocab_size))
    for v, target in zip(movable, shuffled):
        mapping[v] = target
    return mapping


def permute_output_layer(model, mapping: list[int]) -> None:
    """Give ``model`` its own output layer whose row v is the trained row ``mapping[v]`` (in place): the
    input embeddings are untouched, so the model reads text as before and only its predictions move."""
    import torch

    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()[torch.tensor(mapping)]
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    new_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None)
    new_head.weight = torch.nn.Parameter(weight)
    if head.bias is not None:
        new_head.bias = torch.nn.Parameter(head.bias.detach().clone()[torch.tensor(mapping)])
    model.set_output_embeddings(new_head)


def control_teacher(kind: str, teacher_dir: Path, *, size: str, store: ArtifactStore, seed: int = 0) -> Path:
    """The ``kind`` control teacher built from the trained teacher at ``teacher_dir`` (cached)."""
    from kdbench.models import load_model, load_tokenizer, make_model
    from kdbench.teacher_cache import model_fingerprint

    if kind not in TEACHER_CONTROLS:
        raise ConfigError(f"Unknown teacher control {kind!r}; choose one of: {', '.join(TEACHER_CONTROLS)}.")

    def build(tmp: Path) -> dict:
        tokenizer = load_tokenizer(str(teacher_dir))
        if kind == "permuted":
            model = load_model(str(teacher_dir))
            fixed = set(tokenizer.all_special_ids)
            permute_output_layer(model, permutation(model.get_output_embeddings().weight.shape[0], fixed, seed))
        else:
            model = make_model(size, tokenizer, seed=seed + 1, max_positions=model_positions(teacher_dir))
        model.save_pretrained(str(tmp / "model"))
        tokenizer.save_pretrained(str(tmp / "model"))
        return {"kind": kind}

    inputs = {"teacher": model_fingerprint(str(teacher_dir)), "kind": kind, "seed": seed, "size": size}
    return store.get_or_build(f"demo-teacher-{kind}", inputs, build).path / "model"


def model_positions(model_dir: Path) -> int:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 512)
