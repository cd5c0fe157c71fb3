"""kdbench: benchmark-first knowledge distillation for large language models.

The public API lives in submodules, imported lazily so that ``kdbench --help`` stays fast:

* :mod:`kdbench.losses`: every distillation objective as a pure function.
* :mod:`kdbench.train`: the training engine (a ``transformers.Trainer`` subclass) and ``train()``.
* :mod:`kdbench.evaluate`: ``evaluate()`` a model on a suite; :mod:`kdbench.metrics` the metrics.
* :mod:`kdbench.check`: the regression gate; :mod:`kdbench.demo`: the embedded benchmark.
* :mod:`kdbench.store`: run directories and content-addressed artifacts.
"""

__version__ = "0.1.0"
