"""SeqKD's generate stage: interrupted after some prompts and rerun with the same command, it generates only
the prompts it had not finished, and the run ends with the same teacher generations and the same weights as
an uninterrupted run (per-prompt sampling seeds: a resumed generation draws what an uninterrupted one would).
That the generations replace the gold responses in training is pinned in tests/test_wiring_token.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wiring_reference as ref


class _Crash(Exception):
    pass


def test_seqkd_generation_resumes_where_it_stopped(wiring_world, tmp_path, monkeypatch):
    from kdbench.generate import HFBackend

    world = wiring_world
    params = {"max_new_tokens": ref.MAX_NEW_TOKENS}
    settings = dict(generation_batch_size=1, max_steps=2, optim="adamw_torch", learning_rate=1e-3)
    whole = ref.run(world, tmp_path / "whole", "seqkd", world.batch, params, **settings)

    original = HFBackend.generate_ids
    calls = []

    def counted(self, prompt_ids, ids, decoding, seed, **kwargs):
        calls.append(list(ids))
        if crash_after is not None and len(calls) > crash_after:
            raise _Crash("killed during generation")
        return original(self, prompt_ids, ids, decoding, seed, **kwargs)

    monkeypatch.setattr(HFBackend, "generate_ids", counted)
    crash_after = 2
    with pytest.raises(_Crash):
        ref.run(world, tmp_path / "resumed", "seqkd", world.batch, params, **settings)
    assert len(calls) == 3  # two prompts done, the third interrupted
    calls.clear()
    crash_after = None
    resumed = ref.run(world, tmp_path / "resumed", "seqkd", world.batch, params, **settings)
    assert len(calls) == ref.N_ROWS - 2  # only the prompts without a generation

    def generations(result):
        stage = json.loads((result.run.path / "stages.json").read_text())["teacher_responses"]
        return [json.loads(line)["text"] for line in open(Path(stage["path"]) / "generations.jsonl")]

    assert generations(resumed) == generations(whole)
    assert generations(whole) != [r["output"] for r in ref.rows_of(world.batch)]
    a, b = ref.saved_parameters(whole.model_dir), ref.saved_parameters(resumed.model_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
