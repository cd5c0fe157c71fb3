"""Preference training moves the policy the file's way: after training, the policy's
Σ_pairs [log π(chosen) − log π(rejected)] on the file's own texts — computed here independently in float64
(tests/wiring_reference.py) — has risen, and the same run on the file with chosen and rejected swapped
lowers it. The reference never asks the trainer which response it took as chosen, so a pipeline that
swapped the two would fail here."""

from __future__ import annotations

import json

import pytest
import torch

import wiring_reference as ref

METHODS = {
    "dpo": ("dpo", {}),
    "simpo": ("simpo", {}),
    "dpkd-preference-data": ("dpkd", {"pairs": "preference_data"}),
    "dckd": ("dckd", {}),
    "adpa": ("adpa", {"max_new_tokens": ref.MAX_NEW_TOKENS}),
}


def _margin(model_dir, world, path) -> float:
    """Σ over the file's pairs of log π(chosen) − log π(rejected) (summed response log-probs, EOS included)."""
    rows = ref.rows_of(path)
    pad = world.tokenizer.pad_token_id
    model = ref.load64(model_dir)
    vocab = len(world.tokenizer)
    with torch.no_grad():
        chosen, rejected = (ref.pad([ref.tokenized(world.tokenizer, r, r[side]) for r in rows], pad)
                            for side in ("chosen", "rejected"))
        return float((ref.sequence_logps(ref.shifted_logits(model, chosen, vocab), chosen)
                      - ref.sequence_logps(ref.shifted_logits(model, rejected, vocab), rejected)).sum())


@pytest.mark.parametrize("case", sorted(METHODS))
def test_training_raises_the_files_margin_and_a_swapped_file_lowers_it(wiring_world, tmp_path, case):
    method, params = METHODS[case]
    world = wiring_world
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in ref.rows_of(world.prefs)))
    extra = {"init": "student"} if method in ("dpkd", "adpa") else {}
    if method in ("dckd", "adpa"):  # π_dpo: DPO of the teacher on this file (swapped with it), a cached stage
        extra["teacher_dpo_settings"] = {"optim": "adamw_torch", "learning_rate": 3e-3, "max_steps": 6}
    before = _margin(world.student, world, world.prefs)
    after = {}
    for name, data in (("file", world.prefs), ("swapped", swapped)):
        result = ref.run(world, tmp_path / name, method, data, {**params, **extra}, optim="adamw_torch",
                         learning_rate=3e-3, max_steps=6)
        after[name] = _margin(result.model_dir, world, world.prefs)
    assert after["file"] > before + 0.5, (before, after)
    assert after["swapped"] < before - 0.5, (before, after)
