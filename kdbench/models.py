"""Model loading, the small-model factory, and the teacher/student vocabulary check."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdbench.errors import ModelError

# Size names for the factory: (architecture, layers, hidden, heads, intermediate multiple)
SIZES: dict[str, tuple[str, int, int, int]] = {
    "gpt2-nano": ("gpt2", 2, 64, 2),
    "gpt2-micro": ("gpt2", 2, 96, 4),
    "gpt2-mini": ("gpt2", 4, 128, 4),
    "gpt2-small-demo": ("gpt2", 4, 192, 4),
    "gpt2-base-demo": ("gpt2", 6, 256, 8),
    "llama-nano": ("llama", 2, 64, 2),
    "llama-mini": ("llama", 4, 128, 4),
    "llama-small-demo": ("llama", 4, 192, 4),
}


def make_config(size: str, vocab_size: int, *, max_positions: int = 512, pad_token_id: int | None = None,
                bos_token_id: int | None = None, eos_token_id: int | None = None, dropout: float = 0.0):
    """A transformers config for a small model from a size name (see :data:`SIZES`)."""
    if size not in SIZES:
        raise ModelError(f"Unknown model size {size!r}; choose one of: {', '.join(SIZES)}.")
    arch, layers, hidden, heads = SIZES[size]
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                          n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                          pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          tie_word_embeddings=True)
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4 // 1,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, tie_word_embeddings=True, attention_dropout=dropout)


def make_model(size: str, tokenizer, *, seed: int = 0, max_positions: int = 512, dropout: float = 0.0):
    """A freshly initialised causal LM of ``size`` for ``tokenizer`` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(size, len(tokenizer), max_positions=max_positions, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dropout=dropout)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1


def resolve_model_path(name: str | os.PathLike) -> str:
    """A local model directory, or a Hugging Face hub id; anything else is a clear error.

    GGUF names — an alias such as ``smollm2-135m-instruct``, ``path/to/file.gguf`` or
    ``DIR::FILE.gguf`` (see :mod:`kdbench.gguf`) — resolve to their converted checkpoint directory in
    the artifact cache, converting the file the first time.
    """
    from kdbench.gguf import GGUF_ALIASES, convert_gguf, parse_gguf_name

    text = str(name)
    gguf_source = parse_gguf_name(text)
    if gguf_source is not None:
        return str(convert_gguf(gguf_source))
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; pass a directory written by save_pretrained() or a hub id.")
        verify_weight_files(path)
        return str(path)
    if path.exists():
        raise ModelError(f"Model path {path} is a file; pass the model's directory instead (or a .gguf file).")
    if _looks_like_hub_id(text):
        return text
    raise ModelError(f"Model path {text} does not exist; pass a local model directory, a Hugging Face model id, "
                     f"a .gguf file or one of: {', '.join(GGUF_ALIASES)}.")


# Files one of which a local model folder must hold for its tokenizer to load (fast, BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model", "vocab.model")
_PROBE_TEXT = "Hello world, 1 2 3."


def verify_weight_files(path: Path) -> None:
    """Refuse a model folder whose weights are missing, truncated or not weights, before anything is
    loaded or written: each ``*.safetensors`` file's header must parse and cover the file's tensors, and
    every shard a ``*.index.json`` names must exist. (A damaged ``pytorch_model.bin`` is caught when
    :func:`load_model` reads it.)"""
    for index_file in sorted(path.glob("*.index.json")):
        from kdbench.textfile import read_json

        index = read_json(index_file)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ModelError(f"{path} lacks the weight shard {missing[0]} that {index_file.name} names; "
                             "download or copy the complete model folder.")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except ImportError:  # pragma: no cover - safetensors comes with transformers
            return
        except Exception as err:  # SafetensorError and friends: a damaged file, whatever the library calls it
            raise ModelError(f"The weights file {weights} is damaged or truncated ({_first_line(err)}); "
                             "re-download or re-save the model.") from None


def load_tokenizer(name: str | os.PathLike, *, revision: str | None = None):
    """The tokenizer of a model folder or hub id. A folder without tokenizer files, or a tokenizer that
    turns text into no tokens, is a :class:`ModelError` (transformers would otherwise build an empty
    tokenizer and training would silently learn nothing)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES[:4])}, ...); save the "
                         "tokenizer next to the model with tokenizer.save_pretrained(DIR), or copy its files there.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception as err:  # OSError, ValueError, or a parser's own error for a damaged tokenizer file
        raise ModelError(f"Could not load a tokenizer from {source} ({_first_line(err)}); check the path or id.") from None
    try:
        probe = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception as err:
        raise ModelError(f"The tokenizer of {source} cannot encode text ({_first_line(err)}); "
                         "check its tokenizer files.") from None
    if len(tokenizer) < 2 or not probe:
        raise ModelError(f"The tokenizer of {source} turns text into no tokens ({len(tokenizer)} in its vocabulary); "
                         "save the model's real tokenizer next to it with tokenizer.save_pretrained(DIR).")
    if tokenizer.pad_token is None:
        # decoder-only models often ship without a pad token; reuse EOS for padding (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | os.PathLike, *, revision: str | None = None, dtype: str = "float32", trainable: bool = True):
    """Load a causal LM from a directory or hub id; ``trainable=False`` freezes it in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"Could not load a model from {source} ({_first_line(err)}); check the path or id.") from None
    except Exception as err:  # a damaged weights file (unpickling / zip / safetensors errors)
        raise ModelError(f"Could not read the weights of {source} ({type(err).__name__}: {_first_line(err)}); "
                         "they may be damaged or truncated: re-download or re-save the model.") from None
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


@dataclass
class VocabInfo:
    tokenizer_size: int
    embedding_rows: int


def vocab_info(model, tokenizer) -> VocabInfo:
    return VocabInfo(tokenizer_size=len(tokenizer), embedding_rows=model.get_output_embeddings().weight.shape[0])


def check_same_vocabulary(teacher, teacher_tokenizer, student, student_tokenizer) -> int:
    """For token-level methods: teacher and student must share a vocabulary.

    Padded embedding rows beyond the tokenizer's length (Qwen-style checkpoints) are trimmed
    first, so the returned size is the number of logits both models' losses use. A mismatch is a
    :class:`ModelError` naming both sizes.
    """
    t, s = vocab_info(teacher, teacher_tokenizer), vocab_info(student, student_tokenizer)
    if t.tokenizer_size != s.tokenizer_size or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ModelError(
            f"Teacher and student vocabularies differ (teacher {t.tokenizer_size} tokens, student {s.tokenizer_size}); "
            "token-level methods need a shared tokenizer, so use a sequence-level method (ddpo, rdpo, dadpo) or uld "
            "or dskd (token-level across tokenizers) instead."
        )
    if min(t.embedding_rows, s.embedding_rows) < t.tokenizer_size:
        raise ModelError(
            f"A model has fewer output rows ({min(t.embedding_rows, s.embedding_rows)}) than its tokenizer has tokens "
            f"({t.tokenizer_size}); resize its embeddings or use the matching tokenizer."
        )
    return t.tokenizer_size


def count_parameters(model: Any, *, non_embedding: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        embeddings = {id(model.get_input_embeddings().weight)}
        out = model.get_output_embeddings()
        if out is not None:
            embeddings.add(id(out.weight))
        total -= sum(p.numel() for p in model.parameters() if id(p) in embeddings)
        pos = getattr(getattr(model, "transformer", None), "wpe", None)
        if pos is not None:
            total -= pos.weight.numel()
    return total


class LazyModel:
    """A model loaded on first use (attribute access or call), so a stage whose cached artifact is
    reused never loads it. ``load`` is a no-argument loader."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load
        self._model = None

    def loaded(self):
        """The model itself (loaded now if it was not yet)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def __getattr__(self, name):
        return getattr(self.loaded(), name)

    def __call__(self, *args, **kwargs):
        return self.loaded()(*args, **kwargs)


def lazy_model(name: str, **load_kwargs) -> LazyModel:
    """:func:`load_model` of ``name`` (with ``load_kwargs``) deferred until first use."""
    return LazyModel(lambda: load_model(name, **load_kwargs))
