"""Training: ``train(TrainConfig(...))`` runs one method recipe on the shared engine.

See :mod:`kdbench.train.engine` for the ``transformers.Trainer`` subclass and
:mod:`kdbench.train.objectives` for how a recipe's loss is assembled.
"""

from kdbench.train.api import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
