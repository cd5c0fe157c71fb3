"""FSDP2 sharding of the student and of frozen models (kdbench.parallel.sharding).

The slow test runs tests/fsdp_worker.py on 2 CPU processes (torchrun, gloo) and checks what each
rank saw: every parameter of the teacher (GPT-2 and Llama) and of the student is a DTensor
``Shard(0)`` over a mesh of 2 ranks holding half the bytes; the frozen sharded teacher's logits equal
the unsharded model's exactly, also when loaded straight into shards (``load_sharded``);
``full_parameters`` lets ranks run different numbers of forwards;
the gathered state dict equals the unsharded weights; one optimizer step of the sharded student
on each rank's half of a global batch equals the unsharded step on the whole batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_sharding_without_processes_is_one_clear_sentence():
    from kdbench.parallel.sharding import shard_frozen

    from fsdp_worker import tiny_model

    with pytest.raises(ConfigError, match="launch with torchrun"):
        shard_frozen(tiny_model("gpt2"))


def test_block_classes_are_the_decoder_layers():
    from kdbench.parallel.sharding import block_classes, is_sharded, sharding_report

    from fsdp_worker import tiny_model

    for arch, name in (("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")):
        model = tiny_model(arch)
        assert [c.__name__ for c in block_classes(model)] == [name]
        assert not is_sharded(model)
        report = sharding_report(model)
        assert report.sharded_parameters == 0 and report.local_fraction == 1.0 and report.mesh_size == 1


@pytest.mark.slow
def test_two_gloo_ranks_shard_student_and_teacher(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone",
                           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["world"] == 2
        for arch in ("gpt2", "llama"):
            assert seen[f"{arch}_teacher_dtensor"] and seen[f"{arch}_teacher_frozen"]
            assert seen[f"{arch}_teacher_placements"] == ["(Shard(dim=0),)"]
            assert seen[f"{arch}_teacher_mesh"] == [2]
            assert seen[f"{arch}_teacher_local_fraction"] == pytest.approx(0.5, abs=0.01)
            assert seen[f"{arch}_teacher_local_fraction_after"] == seen[f"{arch}_teacher_local_fraction"]
            assert seen[f"{arch}_logits_max_abs_diff"] == 0.0  # the all-gather is exact
            assert seen[f"{arch}_full_parameters_diff"] == 0.0
            assert seen[f"{arch}_local_fraction_after_full_parameters"] == seen[f"{arch}_teacher_local_fraction"]
            assert seen[f"{arch}_loaded_dtensor"] and seen[f"{arch}_loaded_logits_max_abs_diff"] == 0.0
            assert seen[f"{arch}_loaded_local_fraction"] == seen[f"{arch}_teacher_local_fraction"]
        assert seen["student_dtensor"] and seen["student_trainable"] and seen["student_mesh"] == [2]
        assert seen["student_local_fraction"] == pytest.approx(0.5, abs=0.01)
    assert ranks[0]["gpt2_state_dict_equal"] and ranks[0]["llama_state_dict_equal"]
    assert ranks[1]["gpt2_state_dict_empty"] and ranks[1]["llama_state_dict_empty"]
    assert ranks[0]["student_step_max_abs_diff"] < 1e-6
