"""The checkpoints and data files of a full-scale reproduction, at their pinned revisions (``huggingface_hub``'s
cache; a ``hub`` that names a local folder is used as a mirror)."""

from __future__ import annotations

from pathlib import Path


def fetch_model(spec: dict) -> str:
    """A local folder of the checkpoint at its pinned revision."""
    if Path(spec["hub"]).expanduser().is_dir():
        return str(Path(spec["hub"]).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(spec["hub"], revision=spec["revision"])


def fetch_data(spec: dict) -> str:
    """The dataset's training file at its pinned revision."""
    folder = Path(spec["hub"]).expanduser()
    if folder.is_dir():
        return str(folder / spec["file"])
    from huggingface_hub import hf_hub_download

    return hf_hub_download(spec["hub"], spec["file"], repo_type="dataset", revision=spec["revision"])


__all__ = ["fetch_model", "fetch_data"]
