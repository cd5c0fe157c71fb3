"""The offline teacher signal: a top-k cache of the teacher's next-token distribution.

For every response position of a tokenized data set (the positions a token-level loss counts:
``labels[1:] != -100``, in example order, then position order) the cache stores the teacher's k most
probable token ids, their log-probabilities over the full vocabulary (at the recipe's temperature)
and the log of the remaining mass. It is built once per (teacher, tokenized data, k, temperature,
vocabulary size) in the artifact store (:class:`kdbench.store.ArtifactStore`, key from those inputs)
and memory-mapped at training time: a batch gathers its rows with one slice per example, never a
Python object per token.

Files of one cache (all little-endian, row-major)::

    meta.json       format version, k, n_examples, n_positions, dtypes, temperature, vocab_size
    offsets.i64     int64 [n_examples + 1]: example e owns rows offsets[e] : offsets[e+1]
    ids.<dtype>     uint16 (vocabulary <= 65 535) or int32 [n_positions, k]
    logprobs.<dt>   float32 (or float16) [n_positions, k]
    rest.f32        float32 [n_positions]: log(1 - sum of the k probabilities), -inf when empty

Size per position: k·(2 + 4) + 4 bytes at uint16/float32 — 388 bytes at k = 64, against 4·|V| for
dense logits (200 kB for a 50k vocabulary).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.errors import ConfigError, DataError

FORMAT_VERSION = 1
CACHE_KIND = "teacher-topk"


def dataset_fingerprint(dataset) -> str:
    """Hash of a tokenized data set's token ids and labels (what the cache's rows are aligned to)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for index in range(len(dataset)):
        item = dataset[index]
        digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(item["labels"], dtype=np.int64).tobytes())
        digest.update(b"#")
    return digest.hexdigest()


def model_fingerprint(name: str) -> str:
    """Hash of a local model directory's weights and config, or the hub id itself."""
    from kdbench.store import hash_tree

    path = Path(name)
    if path.is_dir():
        return hash_tree(path, suffixes=(".safetensors", ".bin", ".json", ".model", ".txt"))
    return str(name)


@dataclass
class TopKCache:
    """A memory-mapped top-k teacher cache (see module docstring)."""

    path: Path
    k: int
    temperature: float
    vocab_size: int
    offsets: object  # np.ndarray int64 [n_examples + 1]
    ids: object      # np.memmap [n_positions, k]
    logprobs: object  # np.memmap [n_positions, k]
    rest: object     # np.memmap [n_positions]

    @classmethod
    def open(cls, path: str | Path) -> "TopKCache":
        import numpy as np

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{path} is not a teacher cache (no readable meta.json); rebuild it.") from None
        if meta.get("format") != FORMAT_VERSION:
            raise DataError(f"Teacher cache {path} has format {meta.get('format')}, expected {FORMAT_VERSION}; rebuild it.")
        n, k = meta["n_positions"], meta["k"]
        offsets = np.fromfile(path / "offsets.i64", dtype="<i8")

        def mapped(name, dtype, shape):
            if n == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)

        return cls(path=path, k=k, temperature=float(meta["temperature"]), vocab_size=int(meta["vocab_size"]),
                   offsets=offsets, ids=mapped(meta["ids_file"], meta["ids_dtype"], (n, k)),
                   logprobs=mapped(meta["logprobs_file"], meta["logprobs_dtype"], (n, k)),
                   rest=mapped("rest.f32", "<f4", (n,)))

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_positions(self) -> int:
        return int(self.offsets[-1])

    def sparse_batch(self, example_indices: list[int], mask, *, temperature: float):
        """The cached signal of a batch as a :class:`~kdbench.losses.SparseTeacher` of [B, T, k] tensors.

        ``mask``: [B, T] (nonzero = counted response position); example b's cached rows fill its
        counted positions in order. Uncounted positions hold id 0 (never read by the losses).
        """
        import numpy as np
        import torch

        from kdbench.losses import SparseTeacher

        if abs(temperature - self.temperature) > 1e-12:
            raise ConfigError(f"The teacher cache was built at temperature {self.temperature} but the recipe uses "
                              f"{temperature}; rebuild the cache (it is keyed by temperature).")
        batch, length = mask.shape
        ids = torch.zeros((batch, length, self.k), dtype=torch.long)
        logprobs = torch.zeros((batch, length, self.k), dtype=torch.float32)
        rest = torch.full((batch, length), float("-inf"), dtype=torch.float32)
        counted = mask.detach().cpu() != 0
        for row, example in enumerate(example_indices):
            start, end = int(self.offsets[example]), int(self.offsets[example + 1])
            positions = counted[row].nonzero().squeeze(1)
            if len(positions) != end - start:
                raise DataError(f"Teacher cache {self.path} holds {end - start} positions for example {example} but "
                                f"the batch has {len(positions)}; the data or tokenizer changed, so rebuild the cache.")
            ids[row, positions] = torch.from_numpy(np.array(self.ids[start:end], dtype=np.int64))
            logprobs[row, positions] = torch.from_numpy(np.array(self.logprobs[start:end], dtype=np.float32))
            rest[row, positions] = torch.from_numpy(np.array(self.rest[start:end], dtype=np.float32))
        device = mask.device
        return SparseTeacher(ids=ids.to(device), logprobs=logprobs.to(device), rest_logprob=rest.to(device),
                             temperature=self.temperature)


def write_topk_cache(teacher, dataset, out_dir: str | Path, *, k: int, temperature: float, vocab_size: int,
                     batch_size: int = 16, logprobs_dtype: str = "float32", pad_token_id: int = 0,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Run ``teacher`` over ``dataset`` (items with ``input_ids`` and ``labels``) and write the cache
    files into ``out_dir``; returns counts and timings. Batches are appended to the files as they are
    computed (memory stays one batch)."""
    import numpy as np
    import torch

    from kdbench.losses import SparseTeacher

    if not 1 <= k <= vocab_size:
        raise ConfigError(f"Setting teacher_topk must be between 1 and the vocabulary size {vocab_size} (got {k}).")
    if logprobs_dtype not in ("float32", "float16"):
        raise ConfigError("The teacher cache's log-prob dtype must be float32 or float16.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids_dtype = "<u2" if vocab_size <= 65535 else "<i4"
    ids_file = "ids.u16" if ids_dtype == "<u2" else "ids.i32"
    lp_dtype = "<f4" if logprobs_dtype == "float32" else "<f2"
    lp_file = "logprobs.f32" if lp_dtype == "<f4" else "logprobs.f16"
    offsets = [0]
    started = time.time()
    device = next(teacher.parameters()).device
    teacher_tokens = 0
    was_training = teacher.training
    teacher.eval()
    with open(out / ids_file, "wb") as ids_out, open(out / lp_file, "wb") as lp_out, open(out / "rest.f32", "wb") as rest_out:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            longest = max(len(item["input_ids"]) for item in items)
            input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
            labels = torch.full((len(items), longest), -100, dtype=torch.long)
            attention = torch.zeros((len(items), longest), dtype=torch.long)
            for row, item in enumerate(items):
                n = len(item["input_ids"])
                input_ids[row, :n] = torch.tensor(item["input_ids"])
                labels[row, :n] = torch.tensor(item["labels"])
                attention[row, :n] = 1
            with torch.no_grad():
                logits = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            teacher_tokens += int(attention.sum())
            counted = (labels[:, 1:] != -100).to(device)
            selected = logits[:, :-1, :vocab_size][counted]  # [n, V], example order then position order
            for row in range(len(items)):
                offsets.append(offsets[-1] + int(counted[row].sum()))
            if selected.shape[0]:
                signal = SparseTeacher.from_logits(selected.unsqueeze(0), k, temperature=temperature)
                ids_out.write(signal.ids[0].cpu().numpy().astype(ids_dtype).tobytes())
                lp_out.write(signal.logprobs[0].float().cpu().numpy().astype(lp_dtype).tobytes())
                rest_out.write(signal.rest_logprob[0].float().cpu().numpy().astype("<f4").tobytes())
            if progress:
                progress(len(items))
    teacher.train(was_training)
    np.asarray(offsets, dtype="<i8").tofile(out / "offsets.i64")
    meta = {"format": FORMAT_VERSION, "k": k, "temperature": temperature, "vocab_size": vocab_size,
            "n_examples": len(dataset), "n_positions": offsets[-1], "ids_file": ids_file, "ids_dtype": ids_dtype,
            "logprobs_file": lp_file, "logprobs_dtype": lp_dtype}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {"n_positions": offsets[-1], "teacher_forward_tokens": teacher_tokens,
            "cache_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            "compute_seconds": round(time.time() - started, 3)}


def build_topk_cache(teacher, dataset, *, teacher_name: str, k: int, temperature: float, vocab_size: int,
                     store=None, batch_size: int = 16, logprobs_dtype: str = "float32", pad_token_id: int = 0,
                     teacher_dtype: str = "float32", log: Callable[[str], None] | None = None) -> tuple[TopKCache, dict]:
    """The top-k cache of ``teacher`` on ``dataset`` from the artifact store, built on first use.

    Returns (cache, info); ``info["build_seconds"]`` is the time spent building now (0 when reused),
    ``info["teacher_forward_tokens"]`` the teacher tokens the cache cost (also when reused) and
    ``info["reused"]`` says whether an existing cache was found.
    """
    from kdbench.store import ArtifactStore

    store = store or ArtifactStore()
    inputs = {"format": FORMAT_VERSION, "teacher": model_fingerprint(teacher_name), "teacher_dtype": teacher_dtype,
              "data": dataset_fingerprint(dataset), "k": k, "temperature": float(temperature),
              "vocab_size": vocab_size, "logprobs_dtype": logprobs_dtype}

    def build(tmp: Path) -> dict:
        return write_topk_cache(teacher, dataset, tmp, k=k, temperature=temperature, vocab_size=vocab_size,
                                batch_size=batch_size, logprobs_dtype=logprobs_dtype, pad_token_id=pad_token_id)

    started = time.time()
    artifact = store.get_or_build(CACHE_KIND, inputs, build, log=log)
    info = {"reused": artifact.reused, "path": str(artifact.path), "key": artifact.key,
            "build_seconds": 0.0 if artifact.reused else round(time.time() - started, 3),
            "n_positions": artifact.meta.get("n_positions"), "cache_bytes": artifact.meta.get("cache_bytes"),
            "teacher_forward_tokens": artifact.meta.get("teacher_forward_tokens", 0)}  # the cost, even if reused
    return TopKCache.open(artifact.path), info
