"""kdbench: benchmark-first knowledge distillation for large language models.

The public API lives in submodules, imported lazily so that ``kdbench --help`` stays fast:

* :mod:`kdbench.losses`: every distillation objective as a pure function.
* :mod:`kdbench.train`: the training engine (a ``transformers.Trainer`` subclass) and ``train()``.
* :mod:`kdbench.evaluate`: ``evaluate()`` a model on a suite; :mod:`kdbench.metrics` the metrics.
* :func:`kdbench.judge` (:mod:`kdbench.judging.api`): MT-Bench, AlpacaEval and the win rate ω into a run directory.
* :mod:`kdbench.check`: the regression gate; :mod:`kdbench.demo`: the embedded benchmark.
* :mod:`kdbench.store`: run directories and content-addressed artifacts.
"""

from kdbench.version import __version__  # noqa: F401


def judge(protocol: str, **settings):
    """Run a judged protocol and write its run directory: see :func:`kdbench.judging.api.judge`."""
    from kdbench.judging.api import judge as run_judge

    return run_judge(protocol, **settings)
