"""Training: ``train(TrainConfig(...))`` runs one method recipe on the shared engine.

The package's shape (``docs/design.md``, "Add a method"): a recipe (``trainers/*.yaml``) names an objective
(:mod:`kdbench.train.objectives`) — or a family whose loss is a form (:mod:`kdbench.train.preference_forms`,
:mod:`kdbench.train.guided_forms`) —, declares its stages (:mod:`kdbench.train.stage_runner`) and optionally a
sampling form (:mod:`kdbench.train.sampling`); :func:`train` (:mod:`kdbench.train.api`) runs it through one run
lifecycle (:mod:`kdbench.train.run`) and one step-normalised trainer base (:mod:`kdbench.train.trainer_base`).
"""

from __future__ import annotations

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    # Lazy, so that importing a light submodule (the recipe schema, the forms) does not load the trainers.
    if name in ("TrainConfig", "TrainResult"):
        from kdbench.train import settings

        return getattr(settings, name)
    if name == "train":
        from kdbench.train.api import train

        return train
    raise AttributeError(f"module 'kdbench.train' has no attribute {name!r}")
