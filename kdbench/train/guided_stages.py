"""The guided family's stages: the teachers π_ref and π_dpo, and ADPA+'s DCKD student.

* ``ref_teacher``: π_ref = ``--teacher`` as given (``ref_teacher: given``; it is already fine-tuned on the
  task) or fine-tuned on the chosen responses (``ref_teacher: sft``, a cached stage);
* ``dpo_teacher``: π_dpo = π_ref after DPO (β = ``teacher_dpo_beta`` = 0.05, reference = π_ref) on the
  preference data (a cached stage), or ``params.dpo_teacher``;
* ``dckd_student``: ADPA+'s starting point — the ``dckd`` recipe trained as a stage from the same SFT student
  ADPA would start from (adpa_dckd.md Alg. 2), or ``params.dckd_model``.

Every stage trains with its own ``*_settings`` (the paper's, §4.1 / App. F).
"""

from __future__ import annotations

from kdbench.train.params import DCKDStudentParams, DPOTeacherParams, PolicyStartParams, RefTeacherParams
from kdbench.train.stage_runner import Stage, StageContext, register_stage

#: What ADPA+ hands its DCKD stage besides π_dpo and the top-k: a given SFT student (sft_model) is where that
#: stage starts, as in dckd itself.
DCKD_STAGE_PARAMS = ("alpha", "kl_reduction", "temperature", "ref_teacher", "teacher_dpo_beta", "teacher_sft_settings",
                     "teacher_dpo_settings", "init", "sft_model", "sft_settings", "disable_dropout")


def _ref_teacher(ctx: StageContext) -> dict:
    from kdbench.train.stages import model_stage

    ref = ctx.typed(RefTeacherParams)
    ctx.extra["ref_teacher"] = ctx.config.teacher
    if ref.ref_teacher != "sft":
        return {"given": ctx.config.teacher}
    path, facts = model_stage(ctx.config, ctx.store, ctx.run.dir, ctx.say, train_recipe=ctx.train_recipe,
                              kind="sft-model", method="sft", student=ctx.config.teacher, data=ctx.gold_file(),
                              settings=ref.teacher_sft_settings, teacher_stage=True,
                              description="the SFT teacher pi_ref on the chosen responses")
    ctx.extra["ref_teacher"] = str(path)
    return facts


def _dpo_teacher(ctx: StageContext) -> dict:
    from kdbench.train.stages import given_model, model_stage

    dpo = ctx.typed(DPOTeacherParams)
    given = given_model(dpo.dpo_teacher, "dpo_teacher", "a DPO-aligned teacher")
    if given is not None:
        ctx.extra["dpo_teacher"] = str(given)
        return {"given": str(given)}
    path, facts = model_stage(ctx.config, ctx.store, ctx.run.dir, ctx.say, train_recipe=ctx.train_recipe,
                              kind="dpo-teacher", method="dpo", student=ctx.extra.get("ref_teacher", ctx.config.teacher),
                              data=ctx.config.data, params={"beta": dpo.teacher_dpo_beta, "reference": "student"},
                              settings=dpo.teacher_dpo_settings, teacher_stage=True,
                              description="pi_dpo: DPO of pi_ref on the preference data")
    ctx.extra["dpo_teacher"] = str(path)
    return facts


def _dckd_student(ctx: StageContext) -> dict:
    from kdbench.train.stages import given_model, model_stage

    stage = ctx.typed(DCKDStudentParams)
    given = given_model(stage.dckd_model, "dckd_model", "a DCKD student checkpoint")
    if given is not None:
        ctx.policy = str(given)
        return {"given": str(given)}
    params = {k: ctx.recipe.params[k] for k in DCKD_STAGE_PARAMS if k in ctx.recipe.params}
    params.update(dpo_teacher=ctx.extra["dpo_teacher"], loss_topk=stage.dckd_loss_topk)
    path, facts = model_stage(ctx.config, ctx.store, ctx.run.dir, ctx.say, train_recipe=ctx.train_recipe,
                              kind="dckd-model", method="dckd", student=ctx.config.student, teacher=ctx.config.teacher,
                              data=ctx.config.data, params=params, settings=stage.dckd_settings,
                              description="the DCKD student ADPA+ starts from")
    ctx.policy = str(path)
    return facts


def _check_given(*checks: tuple[type, str, str]):
    """A stage check: each (group, parameter, what) names a checkpoint the user may give, checked against the
    student's tokenizer before any file is written."""
    def check(ctx: StageContext) -> None:
        from kdbench.train.stages import given_model

        for group, name, what in checks:
            given_model(getattr(ctx.typed(group), name), name, what, ctx.tokenizer)

    return check


register_stage(Stage("ref_teacher", _ref_teacher, (RefTeacherParams,), needs_teacher=lambda ctx: True,
                     needs_gold=lambda ctx: ctx.typed(RefTeacherParams).ref_teacher == "sft",
                     help="pi_ref: --teacher as given, or fine-tuned on the chosen responses (cached)."))
register_stage(Stage("dpo_teacher", _dpo_teacher, (DPOTeacherParams,),
                     check=_check_given((DPOTeacherParams, "dpo_teacher", "a DPO-aligned teacher")),
                     needs_teacher=lambda ctx: True,
                     help="pi_dpo: pi_ref after DPO on the preference data (cached), or a given checkpoint."))
register_stage(Stage("dckd_student", _dckd_student, (DCKDStudentParams, PolicyStartParams),
                     check=_check_given((DCKDStudentParams, "dckd_model", "a DCKD student checkpoint"),
                                        (PolicyStartParams, "sft_model", "an SFT student checkpoint")),
                     needs_teacher=lambda ctx: True,
                     help="ADPA+'s start: the dckd recipe trained as a stage from the SFT student (cached)."))
