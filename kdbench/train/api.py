"""``train()``: one method recipe, end to end, into a run directory.

1. The recipe is resolved (:func:`kdbench.train.recipes.resolve_recipe`): its objective, declared stages,
   sampling form and checked parameters.
2. Its kind (:data:`KINDS`: ``token``, ``preference``, ``guided``) checks the settings and loads the data,
   tokenizers and models; every stage checks what the user gave for it — all before any file is written.
3. The run directory is opened (:class:`kdbench.train.run.TrainRun`); a run that already finished is returned as
   it is, and rerunning the same command resumes an unfinished one.
4. The declared stages run in order (:func:`kdbench.train.stage_runner.run_stages`), each cached in the artifact
   store and recorded in ``stages.json``; the last, ``train``, is the kind's: it builds the trainer, trains from
   the last complete checkpoint and finishes the run (model, model card, ``cost.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kdbench.store import ArtifactStore
from kdbench.train import kind_guided, kind_preference, kind_token
from kdbench.train.callbacks import Stopwatch
from kdbench.train.recipes import resolve_recipe
from kdbench.train.run import TrainRun
from kdbench.train.settings import TrainConfig, TrainResult
from kdbench.train.stage_runner import StageContext, get_stage, run_stages


@dataclass(frozen=True)
class Kind:
    """A trainer family: ``load(ctx)`` checks and loads everything before the run exists; ``train(ctx)`` is the
    recipe's ``train`` stage and returns the run's result."""

    name: str
    load: Callable[[StageContext], None]
    train: Callable[[StageContext], TrainResult]


#: The trainer families, by an objective's ``kind``.
KINDS: dict[str, Kind] = {
    "token": Kind("token", kind_token.load, kind_token.train),
    "preference": Kind("preference", kind_preference.load, kind_preference.train),
    "guided": Kind("guided", kind_guided.load, kind_guided.train),
}


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None, command: list[str] | None = None,
          progress: bool = True, callbacks: list | None = None) -> TrainResult:
    """Train ``config.student`` with ``config.method``; returns the run and the saved model directory.

    Rerunning with the same ``output_dir``/``run_name`` resumes (see the module docstring); a run that already
    finished is returned as is. ``callbacks``: extra ``TrainerCallback`` objects.
    """
    say = log or (lambda message: None)
    clock = Stopwatch()
    recipe = resolve_recipe(config.method, config.params)
    kind = KINDS[recipe.kind]
    ctx = StageContext(config, recipe, ArtifactStore(config.cache_dir), say, train_recipe=train, command=command,
                       progress=progress, callbacks=callbacks, clock=clock, teacher=config.teacher,
                       policy=config.student)
    kind.load(ctx)
    for name in recipe.stages:
        check = get_stage(name).check if name != "train" else None
        if check is not None:
            check(ctx)
    if recipe.sampling_active and recipe.sampling_spec.check is not None:
        recipe.sampling_spec.check(recipe, config)  # the form's settings, before any file is written
    ctx.run = TrainRun.open(config, recipe, say=say, clock=clock, command=command)
    finished = ctx.run.finished()
    if finished is not None:
        return finished
    return run_stages(ctx, kind.train)
