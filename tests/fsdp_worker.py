"""One rank of the FSDP checks in tests/test_sharding.py (run by torchrun, gloo): writes what it saw
to ``$FSDP_CHECK_OUT/rank<r>.json``. Not a test module itself."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def tiny_model(arch: str, vocab: int = 97):
    from kdbench.models import make_config

    from transformers import AutoModelForCausalLM

    size = {"gpt2": "gpt2-micro", "llama": "llama-nano"}[arch]
    config = make_config(size, vocab, max_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def main(out_dir: str) -> None:
    from torch.distributed.tensor import DTensor, Shard

    from kdbench.parallel.sharding import (full_parameters, full_state_dict, load_sharded, shard_frozen, shard_student,
                                           sharding_report, sum_gradients_over_ranks)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict = {"rank": rank, "world": world}
    # each rank its own batch (as data parallelism gives it), [2, 12] token ids
    generator = torch.Generator().manual_seed(100 + rank)
    batch = torch.randint(3, 97, (2, 12), generator=generator)

    for arch in ("gpt2", "llama"):
        teacher, reference = tiny_model(arch), tiny_model(arch)
        reference.eval()
        shard_frozen(teacher)
        params = dict(teacher.named_parameters())
        seen[f"{arch}_teacher_dtensor"] = all(isinstance(p, DTensor) for p in params.values())
        seen[f"{arch}_teacher_placements"] = sorted({str(p.placements) for p in params.values()})
        seen[f"{arch}_teacher_mesh"] = sorted({p.device_mesh.size() for p in params.values()})
        seen[f"{arch}_teacher_frozen"] = not any(p.requires_grad for p in params.values()) and not teacher.training
        report = sharding_report(teacher)
        seen[f"{arch}_teacher_local_fraction"] = report.local_fraction
        with torch.no_grad():
            sharded_logits = teacher(input_ids=batch).logits
            full_logits = reference(input_ids=batch).logits
        seen[f"{arch}_logits_max_abs_diff"] = float((sharded_logits - full_logits).abs().max())
        # after the forward the blocks are resharded again (no full copy left behind)
        seen[f"{arch}_teacher_local_fraction_after"] = sharding_report(teacher).local_fraction

        # different numbers of forwards per rank inside full_parameters: no collective, no hang
        with torch.no_grad(), full_parameters(teacher):
            for _ in range(1 + 2 * rank):
                inside = teacher(input_ids=batch).logits
        seen[f"{arch}_full_parameters_diff"] = float((inside - full_logits).abs().max())
        seen[f"{arch}_local_fraction_after_full_parameters"] = sharding_report(teacher).local_fraction

        # loading a checkpoint straight into shards (each rank reads its rows) gives the same model
        checkpoint = os.path.join(out_dir, f"{arch}-checkpoint")
        if rank == 0:
            reference.save_pretrained(checkpoint)
        dist.barrier()
        loaded = load_sharded(checkpoint)
        seen[f"{arch}_loaded_dtensor"] = all(isinstance(p, DTensor) for p in loaded.parameters())
        seen[f"{arch}_loaded_local_fraction"] = sharding_report(loaded).local_fraction
        with torch.no_grad():
            seen[f"{arch}_loaded_logits_max_abs_diff"] = float((loaded(input_ids=batch).logits - full_logits).abs().max())

        # gathered state dict on rank 0 equals the unsharded weights
        state = full_state_dict(teacher)
        if rank == 0:
            expected = reference.state_dict()
            seen[f"{arch}_state_dict_equal"] = all(torch.equal(state[k], expected[k]) for k in state) and \
                set(state) <= set(expected)
        else:
            seen[f"{arch}_state_dict_empty"] = state == {}

    # the student: sharded, trainable; one step on each rank's half of the global batch equals one step
    # of the unsharded model on the whole global batch (sum over tokens / tokens of the global step)
    student, single = tiny_model("gpt2"), tiny_model("gpt2")
    shard_student(student)
    sum_gradients_over_ranks(student)
    params = list(student.parameters())
    seen["student_dtensor"] = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
    seen["student_mesh"] = sorted({p.device_mesh.size() for p in params})
    seen["student_trainable"] = all(p.requires_grad for p in params)
    seen["student_local_fraction"] = sharding_report(student).local_fraction
    everyone = [torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    global_tokens = sum(b[:, 1:].numel() for b in everyone)

    def token_loss_sum(model, ids):
        logits = model(input_ids=ids).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                 reduction="sum")

    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    (token_loss_sum(student, batch) / global_tokens).backward()
    optimizer.step()
    single_optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    (sum(token_loss_sum(single, b) for b in everyone) / global_tokens).backward()
    single_optimizer.step()
    trained = full_state_dict(student)
    if rank == 0:
        expected = single.state_dict()
        seen["student_step_max_abs_diff"] = max(float((trained[k] - expected[k]).abs().max()) for k in trained)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(seen, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
