"""derive_student on tiny random Llama and GPT-2 teachers: which weights are kept, shapes, forward passes."""

from __future__ import annotations

import json

import pytest
import torch

from kdbench.errors import ConfigError, ModelError
from kdbench.models import check_same_vocabulary, load_model, load_tokenizer
from kdbench.students import STUDENT_RECORD, derive_student, read_student_record, select_layers

TEACHER_LAYERS = 6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from kdbench.synthetic.corpus import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([{"instruction": "the cat sat on the mat", "output": "a dog ran in the park"}], folder)
    return folder


def _save_teacher(config, tokenizer_dir, folder):
    from transformers import AutoModelForCausalLM

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases start constant; make every entry distinctive
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import LlamaConfig

    # untied lm_head so its slicing is visible; 4 heads of 8 with 2 kv heads (GQA as in SmolLM2)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return _save_teacher(config, tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import GPT2Config

    config = GPT2Config(n_embd=32, n_layer=TEACHER_LAYERS, n_head=4, n_positions=64, tie_word_embeddings=True)
    return _save_teacher(config, tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


BLOCK = {"llama": "model.layers.", "gpt2": "transformer.h."}


def _params(model_dir) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(model_dir, trainable=False).state_dict().items()}


def _block(params: dict, prefix: str, index: int) -> dict[str, torch.Tensor]:
    head = f"{prefix}{index}."
    return {k[len(head):]: v for k, v in params.items() if k.startswith(head)}


def test_select_layers():
    assert select_layers(30, 6, "even") == [0, 6, 12, 17, 23, 29]
    assert select_layers(6, 3, "even") == [0, 3, 5]  # 2.5 rounds half up
    assert select_layers(6, 6, "even") == list(range(6))
    assert select_layers(6, 1, "even") == [0]
    assert select_layers(6, 2, "first") == [0, 1]
    with pytest.raises(ConfigError, match="between 1 and the teacher's 6"):
        select_layers(6, 7)
    with pytest.raises(ConfigError, match="'even' or 'first'"):
        select_layers(6, 2, "random")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("selection,kept", [("even", [0, 3, 5]), ("first", [0, 1, 2])])
def test_kept_layers_are_copies_of_the_selected_teacher_blocks(arch, selection, kept, llama_teacher, gpt2_teacher,
                                                               tmp_path):
    teacher_dir = {"llama": llama_teacher, "gpt2": gpt2_teacher}[arch]
    out = derive_student(teacher_dir, tmp_path / "student", layers=3, selection=selection)
    teacher, student = _params(teacher_dir), _params(out)
    prefix = BLOCK[arch]
    for j, i in enumerate(kept):
        student_block, teacher_block = _block(student, prefix, j), _block(teacher, prefix, i)
        assert student_block.keys() == teacher_block.keys()
        for name in teacher_block:
            assert torch.equal(student_block[name], teacher_block[name]), (j, i, name)
        first = next(iter(student_block))
        for other in sorted(set(range(TEACHER_LAYERS)) - {i}):  # and not of any other block
            assert not torch.equal(student_block[first], _block(teacher, prefix, other)[first])
    assert not any(k.startswith(f"{prefix}3.") for k in student)
    for name in student:  # embeddings, final norm, lm_head: unchanged
        if not name.startswith(prefix):
            assert torch.equal(student[name], teacher[name]), name
    record = read_student_record(out)
    assert record["kept_layers"] == kept and record["teacher_layers"] == TEACHER_LAYERS
    assert record["recipe"]["selection"] == selection and record["tensors_copied"] == len(student)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keeping_every_layer_reproduces_the_teacher_exactly(arch, llama_teacher, gpt2_teacher, tmp_path):
    teacher_dir = {"llama": llama_teacher, "gpt2": gpt2_teacher}[arch]
    out = derive_student(teacher_dir, tmp_path / "student", layers=TEACHER_LAYERS)
    ids = torch.tensor([[2, 5, 7, 9, 11, 4]])
    expected = load_model(teacher_dir, trainable=False)(ids).logits
    torch.testing.assert_close(load_model(out, trainable=False)(ids).logits, expected, rtol=0, atol=0)


def test_llama_narrowing_keeps_leading_blocks(llama_teacher, tmp_path):
    out = derive_student(llama_teacher, tmp_path / "student", layers=2, hidden_size=16, intermediate_size=24)
    teacher, student = _params(llama_teacher), _params(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (16, 24, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    kept = [0, 5]
    expected_slices = {
        "self_attn.q_proj.weight": ((32, 16), (slice(None), slice(0, 16))),  # all heads, first 16 residual inputs
        "self_attn.k_proj.weight": ((16, 16), (slice(None), slice(0, 16))),
        "self_attn.v_proj.weight": ((16, 16), (slice(None), slice(0, 16))),
        "self_attn.o_proj.weight": ((16, 32), (slice(0, 16), slice(None))),  # writes the first 16 residual dims
        "mlp.gate_proj.weight": ((24, 16), (slice(0, 24), slice(0, 16))),  # neurons 0..23
        "mlp.up_proj.weight": ((24, 16), (slice(0, 24), slice(0, 16))),
        "mlp.down_proj.weight": ((16, 24), (slice(0, 16), slice(0, 24))),
        "input_layernorm.weight": ((16,), (slice(0, 16),)),
        "post_attention_layernorm.weight": ((16,), (slice(0, 16),)),
    }
    for j, i in enumerate(kept):
        for name, (shape, index) in expected_slices.items():
            value = student[f"model.layers.{j}.{name}"]
            assert tuple(value.shape) == shape, name
            assert torch.equal(value, teacher[f"model.layers.{i}.{name}"][index]), name
    vocab = teacher["model.embed_tokens.weight"].shape[0]
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"][:, :16])
    assert torch.equal(student["lm_head.weight"], teacher["lm_head.weight"][:, :16])
    assert torch.equal(student["model.norm.weight"], teacher["model.norm.weight"][:16])
    ids = torch.tensor([[2, 5, 7, 9]])
    logits = load_model(out, trainable=False)(ids).logits
    assert logits.shape == (1, 4, vocab) and torch.isfinite(logits).all()
    record = read_student_record(out)
    assert record["kept_hidden_dims"] == [0, 16] and record["kept_intermediate_neurons"] == [0, 24]
    assert record["kept_heads"] == [0, 4]


def test_gpt2_narrowing_keeps_leading_heads_and_neurons(gpt2_teacher, tmp_path):
    out = derive_student(gpt2_teacher, tmp_path / "student", layers=2, hidden_size=16, intermediate_size=48)
    teacher, student = _params(gpt2_teacher), _params(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_embd"], config["n_inner"], config["n_layer"], config["n_head"]) == (16, 48, 2, 2)
    for j, i in enumerate([0, 5]):
        s, t = _block(student, "transformer.h.", j), _block(teacher, "transformer.h.", i)
        # c_attn columns are [query | key | value], 32 each in the teacher: the first 16 of each
        expected_attn = torch.cat([t["attn.c_attn.weight"][:16, 0:16], t["attn.c_attn.weight"][:16, 32:48],
                                   t["attn.c_attn.weight"][:16, 64:80]], dim=1)
        assert torch.equal(s["attn.c_attn.weight"], expected_attn)
        assert torch.equal(s["attn.c_attn.bias"], torch.cat([t["attn.c_attn.bias"][k:k + 16] for k in (0, 32, 64)]))
        assert torch.equal(s["attn.c_proj.weight"], t["attn.c_proj.weight"][:16, :16])
        assert torch.equal(s["mlp.c_fc.weight"], t["mlp.c_fc.weight"][:16, :48])
        assert torch.equal(s["mlp.c_fc.bias"], t["mlp.c_fc.bias"][:48])
        assert torch.equal(s["mlp.c_proj.weight"], t["mlp.c_proj.weight"][:48, :16])
        assert torch.equal(s["ln_1.bias"], t["ln_1.bias"][:16])
    assert torch.equal(student["transformer.wpe.weight"], teacher["transformer.wpe.weight"][:, :16])
    assert torch.equal(student["transformer.wte.weight"], teacher["transformer.wte.weight"][:, :16])
    logits = load_model(out, trainable=False)(torch.tensor([[2, 5, 7, 9]])).logits
    assert logits.shape[-1] == teacher["transformer.wte.weight"].shape[0] and torch.isfinite(logits).all()
    with pytest.raises(ConfigError, match="multiple of the head size 8"):
        derive_student(gpt2_teacher, tmp_path / "bad", layers=2, hidden_size=12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropping_dead_mlp_neurons_keeps_the_function(arch, tokenizer_dir, tmp_path):
    """Functional check of the MLP slice: neurons k.. of a teacher whose output weights are zero contribute
    nothing, so the student that drops exactly those neurons computes the teacher's logits."""
    from transformers import AutoModelForCausalLM

    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64)
    else:
        from transformers import GPT2Config

        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    teacher_dir = _save_teacher(config, tokenizer_dir, tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        for block in (teacher.model.layers if arch == "llama" else teacher.transformer.h):
            if arch == "llama":
                block.mlp.down_proj.weight[:, 40:] = 0
            else:
                block.mlp.c_proj.weight[40:, :] = 0
    teacher.save_pretrained(teacher_dir)
    out = derive_student(teacher_dir, tmp_path / "student", layers=2, intermediate_size=40)
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    torch.testing.assert_close(load_model(out, trainable=False)(ids).logits, teacher.eval()(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_scratch_has_the_same_shape_but_fresh_weights(arch, llama_teacher, gpt2_teacher, tmp_path):
    teacher_dir = {"llama": llama_teacher, "gpt2": gpt2_teacher}[arch]
    pruned = derive_student(teacher_dir, tmp_path / "pruned", layers=2, intermediate_size=32)
    scratch = derive_student(teacher_dir, tmp_path / "scratch", layers=2, intermediate_size=32, from_scratch=True)
    again = derive_student(teacher_dir, tmp_path / "scratch2", layers=2, intermediate_size=32, from_scratch=True)
    other_seed = derive_student(teacher_dir, tmp_path / "scratch3", layers=2, intermediate_size=32, from_scratch=True,
                                seed=1)
    p, s = _params(pruned), _params(scratch)
    assert {k: v.shape for k, v in p.items()} == {k: v.shape for k, v in s.items()}
    weight = f"{BLOCK[arch]}0.{'mlp.up_proj.weight' if arch == 'llama' else 'mlp.c_fc.weight'}"
    assert not torch.equal(p[weight], s[weight])
    assert torch.equal(_params(again)[weight], s[weight])  # seeded
    assert not torch.equal(_params(other_seed)[weight], s[weight])
    record = read_student_record(scratch)
    assert record["recipe"]["from_scratch"] is True and record["tensors_copied"] == 0
    # same tokenizer, so token-level KD applies
    teacher_model = load_model(teacher_dir, trainable=False)
    assert check_same_vocabulary(teacher_model, load_tokenizer(teacher_dir), load_model(scratch),
                                 load_tokenizer(scratch)) == len(load_tokenizer(teacher_dir))


def test_rerun_reuses_and_conflicts_are_errors(llama_teacher, tmp_path):
    out = derive_student(llama_teacher, tmp_path / "student", layers=2)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert derive_student(llama_teacher, out, layers=2) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ModelError, match="already holds a different model"):
        derive_student(llama_teacher, out, layers=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="holds no kdbench student"):
        derive_student(llama_teacher, tmp_path / "other", layers=2)
    assert not list(tmp_path.glob(".*building*"))
    assert (out / STUDENT_RECORD).is_file()


def test_invalid_sizes(llama_teacher, tmp_path):
    with pytest.raises(ConfigError, match="hidden_size must be between 1 and the teacher's 32"):
        derive_student(llama_teacher, tmp_path / "s", layers=2, hidden_size=64)
    with pytest.raises(ConfigError, match="intermediate_size must be between 1 and the teacher's 64"):
        derive_student(llama_teacher, tmp_path / "s", layers=2, intermediate_size=0)
    with pytest.raises(ConfigError, match="layers must be between 1"):
        derive_student(llama_teacher, tmp_path / "s", layers=0)
    assert not (tmp_path / "s").exists()
