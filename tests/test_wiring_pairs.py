"""Pair and guided recipes are wired to their definitions (METHODS.md): for each recipe the first training
step's logged loss equals an independent float64 reference (tests/wiring_reference.py) and the one SGD step
moved the policy by exactly −lr × the reference's gradient — so the step catches a swapped chosen/rejected,
a swapped reference (π_dpo ↔ π_ref, dSFT ↔ teacher), a swapped y_t ↔ y_s, or a wrong starting checkpoint
even where the loss itself is log 2. Every role is played by a different model (the world's student,
SFT student, dSFT model, teacher and DPO teacher all differ). β, γ, α, λ, forms and normalisations come from
the resolved recipe. Distilled pairs are generated greedily (the recipes' default for the daDPO family;
DPKD's `greedy: true`), so the reference decodes them itself with transformers' generate."""

from __future__ import annotations

import pytest
import torch

import wiring_reference as ref

GEN = {"max_new_tokens": ref.MAX_NEW_TOKENS}


def _value(loss) -> float:
    return float(loss.detach())


def _pairs(world, rows, chosen, rejected):
    """Chosen and rejected batches ([P, L]) of (text, finished) responses."""
    pad = world.tokenizer.pad_token_id
    return (ref.pad([ref.tokenized(world.tokenizer, r, t, f) for r, (t, f) in zip(rows, chosen)], pad),
            ref.pad([ref.tokenized(world.tokenizer, r, t, f) for r, (t, f) in zip(rows, rejected)], pad))


def _logps(model, batches, vocab, grad=True):
    with torch.set_grad_enabled(grad):
        return [ref.sequence_logps(ref.shifted_logits(model, b, vocab), b) for b in batches]


def _dpo(beta, pc, pr, rc, rr):
    return -ref.log_sigmoid(beta * ((pc - rc) - (pr - rr)))


def _check(world, result, start, policy, loss):
    assert ref.logged(result)["loss"] == pytest.approx(_value(loss), rel=1e-5, abs=1e-7)
    ref.assert_one_sgd_step(start, result.model_dir, policy, loss)


# ------------------------------------------------------------------------------------------ preference files
FILE_CASES = {
    "dpo": ("dpo", {}),
    "dpo-teacher-reference": ("dpo", {"reference": "teacher"}),
    "dpo-beta": ("dpo", {"beta": 0.5}),
    "simpo": ("simpo", {}),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_preference_file_recipes(wiring_world, tmp_path, case):
    """DPO (reference: the frozen initial student or the teacher) and SimPO on the file's chosen/rejected."""
    method, overrides = FILE_CASES[case]
    world = wiring_world
    params = ref.resolved(method, overrides)
    result = ref.run(world, tmp_path, method, world.prefs, overrides)
    rows = ref.rows_of(world.prefs)
    batches = _pairs(world, rows, [(r["chosen"], True) for r in rows], [(r["rejected"], True) for r in rows])
    vocab = len(world.tokenizer)
    policy = ref.load64(world.student)
    pc, pr = _logps(policy, batches, vocab)
    if params["preference_form"] == "simpo":
        c_len, r_len = (ref.response_lengths(b) for b in batches)
        beta, gamma = float(params["beta"]), float(params["gamma"])
        per_pair = -ref.log_sigmoid(beta * pc / c_len - beta * pr / r_len - gamma)
    else:
        reference = world.student if params["reference"] == "student" else world.teacher
        rc, rr = _logps(ref.load64(reference), batches, vocab, grad=False)
        per_pair = _dpo(float(params["beta"]), pc, pr, rc, rr)
    _check(world, result, world.student, policy, per_pair.mean())


# ------------------------------------------------------------------------------------------ the daDPO family
DISTILL_CASES = {
    "ddpo": ("ddpo", {}),
    "rdpo": ("rdpo", {}),
    "dadpo": ("dadpo", {}),
    "dadpo-betas": ("dadpo", {"beta1": 0.3, "beta2": 0.05}),
    "ddpo_kl": ("ddpo_kl", {}),
    "ddpo_kl-forward": ("ddpo_kl", {"kl_divergence": "fkl"}),
    "ddpo-teacher-reference": ("ddpo", {"reference": "teacher"}),
    "ddpo-student-reference": ("ddpo", {"reference": "student"}),
}
def cases(table: dict) -> list:
    return [pytest.param(name) for name in sorted(table)]


def _distill_reference(world, params, batches, vocab):
    """{name: (chosen, rejected)} frozen log-probs: "dsft", "teacher" and "student" (the original one)."""
    models = {"dsft": world.dsft, "teacher": world.teacher, "student": world.student}
    return {name: _logps(ref.load64(path), batches, vocab, grad=False) for name, path in models.items()}


@pytest.mark.parametrize("case", cases(DISTILL_CASES))
def test_distilled_pair_recipes(wiring_world, tmp_path, case):
    """dDPO / rDPO / daDPO / ddpo_kl from the given dSFT model: chosen = the teacher's greedy output y_t,
    rejected = the *original* student's greedy output y_s; reference per recipe; + λ·token KL on y_t."""
    method, overrides = DISTILL_CASES[case]
    world = wiring_world
    overrides = {**overrides, **GEN, "dsft_model": str(world.dsft)}
    params = ref.resolved(method, overrides)
    result = ref.run(world, tmp_path, method, world.batch, overrides)
    rows = ref.rows_of(world.batch)
    y_t = ref.greedy_responses(world.teacher, world.tokenizer, rows, int(params["max_new_tokens"]))
    y_s = ref.greedy_responses(world.student, world.tokenizer, rows, int(params["max_new_tokens"]))
    assert all(f for _, f in y_t + y_s) and y_t != y_s
    batches = _pairs(world, rows, y_t, y_s)
    vocab = len(world.tokenizer)
    policy = ref.load64(world.dsft)
    pc, pr = _logps(policy, batches, vocab)
    frozen = _distill_reference(world, params, batches, vocab)
    if params["preference_form"] == "dadpo":
        (rc, rr), (tc, tr) = frozen["dsft"], frozen["teacher"]
        h = float(params["beta1"]) * ((pc - rc) - (pr - rr)) + float(params["beta2"]) * ((pc - tc) - (pr - tr))
        per_pair = -ref.log_sigmoid(h)
    else:
        rc, rr = frozen[params["reference"]]
        per_pair = _dpo(float(params["beta"]), pc, pr, rc, rr)
    loss = per_pair.mean()
    if float(params.get("kl_weight", 0)) > 0:
        chosen = batches[0]
        with torch.no_grad():
            teacher_logits = ref.shifted_logits(ref.load64(world.teacher), chosen, vocab)
        targets, mask = ref.targets_mask(chosen)
        kl_params = {"divergence": params["kl_divergence"], "kd_ratio": 1.0, "kd_weighting": "additive"}
        student_logits = ref.shifted_logits(policy, chosen, vocab)
        kl_only = ref.token_kd_loss(kl_params, student_logits, teacher_logits, targets, mask) \
            - ref.ce_mean(student_logits, targets, mask)
        loss = loss + float(params["kl_weight"]) * kl_only
    _check(world, result, world.dsft, policy, loss)


# ------------------------------------------------------------------------------------------ DPKD
DPKD_CASES = {
    "online": {},
    "offline": {"pairs": "offline"},
    "unnormalized": {"length_normalize": False},
    "cpo": {"preference_form": "cpo"},
    "cpo-sequence-nll": {"preference_form": "cpo", "cpo_nll": "sequence_sum"},
    "simpo": {"preference_form": "simpo", "beta": 2.0},
    "init-student": {"init": "student"},
    "lm-weight": {"lm_weight": 0.2, "beta": 0.4},  # lm_weight: the run's setting (the LM term's weight)
    "ipo": {"preference_form": "ipo"},
}


def _dpkd_per_pair(params, pc, pr, tc, tr, c_len, r_len):
    form = params["preference_form"]
    beta = float(params["beta"])
    if form == "dpkd":  # dpkd_v1.md Eq. 9: DPO with the teacher as reference, 1/|y| per response
        # length_normalize null = the form's own reading: Eq. 9 divides (METHODS.md)
        normalize = True if params["length_normalize"] is None else params["length_normalize"]
        c_norm, r_norm = (c_len, r_len) if normalize else (1.0, 1.0)
        return -ref.log_sigmoid(beta * (pc - tc) / c_norm - beta * (pr - tr) / r_norm)
    if form == "ipo":  # METHODS.md: summed log-ratios, teacher reference
        assert not params["length_normalize"]  # null or false: IPO's Eq. 17 sums
        return (((pc - tc) - (pr - tr)) - 1 / (2 * float(params["tau"]))) ** 2
    if form == "cpo":
        nll = -pc / c_len if params["cpo_nll"] == "token_mean" else -pc
        return -ref.log_sigmoid(beta * pc - beta * pr) + nll
    if form == "simpo":
        return -ref.log_sigmoid(beta * pc / c_len - beta * pr / r_len - float(params["gamma"]))
    raise AssertionError(form)


@pytest.mark.parametrize("case", cases(DPKD_CASES))
def test_dpkd_first_step(wiring_world, tmp_path, case):
    """DPKD (dpkd_v1.md Alg. 1) from the given SFT student (or --student with init: student): chosen = the
    teacher's response y_t, rejected = the policy's own response y_s (online: sampled in the step from the
    current policy, which at step 1 is the start; offline: generated once from the start), both greedy
    here; + lm_weight × token-mean CE on the gold responses."""
    world = wiring_world
    overrides = dict(DPKD_CASES[case])
    settings = {"lm_weight": overrides.pop("lm_weight")} if "lm_weight" in overrides else {}
    overrides = {**overrides, **GEN, "greedy": True, "sft_model": str(world.student_sft)}
    params = ref.resolved("dpkd", overrides)
    result = ref.run(world, tmp_path, "dpkd", world.batch, overrides, **settings)
    start = world.student_sft if params["init"] == "sft" or params.get("sft_model") else world.student
    rows = ref.rows_of(world.batch)
    y_t = ref.greedy_responses(world.teacher, world.tokenizer, rows, int(params["max_new_tokens"]))
    y_s = ref.greedy_responses(start, world.tokenizer, rows, int(params["max_new_tokens"]))
    assert all(f for _, f in y_t + y_s) and y_t != y_s
    batches = _pairs(world, rows, y_t, y_s)
    vocab = len(world.tokenizer)
    policy = ref.load64(start)
    pc, pr = _logps(policy, batches, vocab)
    tc, tr = _logps(ref.load64(world.teacher), batches, vocab, grad=False)
    c_len, r_len = (ref.response_lengths(b) for b in batches)
    loss = _dpkd_per_pair(params, pc, pr, tc, tr, c_len, r_len).mean()
    gold = ref.pad([ref.tokenized(world.tokenizer, r, r["output"]) for r in rows], world.tokenizer.pad_token_id)
    targets, mask = ref.targets_mask(gold)
    loss = loss + ref.lm_weight("dpkd", settings) * ref.ce_mean(ref.shifted_logits(policy, gold, vocab), targets, mask)
    _check(world, result, start, policy, loss)


def test_dpkd_on_preference_data(wiring_world, tmp_path):
    """pairs: preference_data (DPKD as the ADPA paper's baseline): the file's chosen/rejected, teacher as
    reference, LM term on the chosen responses."""
    world = wiring_world
    overrides = {"pairs": "preference_data", "sft_model": str(world.student_sft)}
    params = ref.resolved("dpkd", overrides)
    result = ref.run(world, tmp_path, "dpkd", world.prefs, overrides)
    rows = ref.rows_of(world.prefs)
    batches = _pairs(world, rows, [(r["chosen"], True) for r in rows], [(r["rejected"], True) for r in rows])
    vocab = len(world.tokenizer)
    policy = ref.load64(world.student_sft)
    pc, pr = _logps(policy, batches, vocab)
    tc, tr = _logps(ref.load64(world.teacher), batches, vocab, grad=False)
    c_len, r_len = (ref.response_lengths(b) for b in batches)
    loss = _dpkd_per_pair(params, pc, pr, tc, tr, c_len, r_len).mean()
    loss = loss + ref.lm_weight("dpkd") * (-pc.sum() / c_len.sum())
    _check(world, result, world.student_sft, policy, loss)


# ------------------------------------------------------------------------------------------ DCKD, ADPA, ADPA+
def _dckd_loss(params, policy, teacher, batches, vocab):
    """CE(y_w) + α·(FKL(π_dpo‖π_θ) on y_w + FKL on y_l), each a token mean (kl_reduction: token_mean) or the
    KLs summed per sequence and averaged over sequences (sequence_sum); τ divides both models' logits."""
    tau = float(params["temperature"])
    chosen, rejected = batches
    total = 0.0
    kls = []
    for batch in (chosen, rejected):
        logits = ref.shifted_logits(policy, batch, vocab)
        with torch.no_grad():
            teacher_logits = ref.shifted_logits(teacher, batch, vocab)
        targets, mask = ref.targets_mask(batch)
        per_token = ref.kl(torch.log_softmax(teacher_logits / tau, -1), torch.log_softmax(logits / tau, -1)) * mask
        kls.append(per_token.sum() / (mask.sum() if params["kl_reduction"] == "token_mean" else mask.shape[0]))
        if batch is chosen:
            total = ref.ce_mean(logits, targets, mask)
    return total + float(params["alpha"]) * (kls[0] + kls[1])


DCKD_CASES = {"dckd": {}, "dckd-alpha-temperature": {"alpha": 0.7, "temperature": 2.0},
              "dckd-sequence-sum": {"kl_reduction": "sequence_sum"}, "dckd-sft-start": {"init": "sft"}}


@pytest.mark.parametrize("case", sorted(DCKD_CASES))
def test_dckd_first_step(wiring_world, tmp_path, case):
    """DCKD (adpa_dckd.md §3.2) with the given π_dpo, from --student (init: student) or the given SFT
    student (init: sft)."""
    world = wiring_world
    overrides = {**DCKD_CASES[case], "dpo_teacher": str(world.dpo_teacher)}
    if overrides.get("init") == "sft":
        overrides["sft_model"] = str(world.student_sft)
    params = ref.resolved("dckd", overrides)
    result = ref.run(world, tmp_path, "dckd", world.prefs, overrides)
    start = world.student_sft if params.get("sft_model") else world.student
    rows = ref.rows_of(world.prefs)
    batches = _pairs(world, rows, [(r["chosen"], True) for r in rows], [(r["rejected"], True) for r in rows])
    policy = ref.load64(start)
    loss = _dckd_loss(params, policy, ref.load64(world.dpo_teacher), batches, len(world.tokenizer))
    _check(world, result, start, policy, loss)


def _adpa_loss(params, world, policy, start, rows, vocab):
    """CE(y_w) + γ·mean_t[−Σ_a π_θ(a|s_t)(log π_dpo(a|s_t) − log π_ref(a|s_t))] over the positions of ŷ, the
    starting student's greedy response (adpa_dckd.md Eq. 10; token mean, or per-sequence sums averaged over
    sequences with adpa_reduction: sequence_sum)."""
    y_hat = ref.greedy_responses(start, world.tokenizer, rows, int(params["max_new_tokens"]))
    assert all(f for _, f in y_hat)
    chosen, own = _pairs(world, rows, [(r["chosen"], True) for r in rows], y_hat)
    targets, mask = ref.targets_mask(chosen)
    ce = ref.ce_mean(ref.shifted_logits(policy, chosen, vocab), targets, mask)
    logits = ref.shifted_logits(policy, own, vocab)
    with torch.no_grad():
        advantage = (torch.log_softmax(ref.shifted_logits(ref.load64(world.dpo_teacher), own, vocab), -1)
                     - torch.log_softmax(ref.shifted_logits(ref.load64(world.teacher), own, vocab), -1))
    _, own_mask = ref.targets_mask(own)
    per_position = -(torch.softmax(logits, -1) * advantage).sum(-1) * own_mask
    denominator = own_mask.sum() if params["adpa_reduction"] == "token_mean" else own_mask.shape[0]
    return ce + float(params["gamma"]) * per_position.sum() / denominator


ADPA_CASES = {"adpa": ("adpa", {}), "adpa-gamma-sum": ("adpa", {"gamma": 0.7, "adpa_reduction": "sequence_sum"}),
              "adpa_plus": ("adpa_plus", {})}


@pytest.mark.parametrize("case", sorted(ADPA_CASES))
def test_adpa_first_step(wiring_world, tmp_path, case):
    """ADPA from the given SFT student, ADPA+ from the given DCKD student: π_ref = --teacher, π_dpo = the given
    DPO teacher, ŷ from the starting student."""
    method, overrides = ADPA_CASES[case]
    world = wiring_world
    overrides = {**overrides, **GEN, "dpo_teacher": str(world.dpo_teacher)}
    if method == "adpa":
        overrides["sft_model"] = str(world.student_sft)
    else:
        overrides["dckd_model"] = str(world.student_sft)
    params = ref.resolved(method, overrides)
    assert params["greedy"] and not params["loss_topk"]
    result = ref.run(world, tmp_path, method, world.prefs, overrides)
    policy = ref.load64(world.student_sft)
    loss = _adpa_loss(params, world, policy, world.student_sft, ref.rows_of(world.prefs), len(world.tokenizer))
    _check(world, result, world.student_sft, policy, loss)


STEP = {"optim": "sgd", "learning_rate": ref.STEP_LR, "max_steps": 1, "batch_size": ref.N_ROWS, "max_grad_norm": 0.0,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "weight_decay": 0.0, "grad_accum": 1}


def test_adpa_plus_dckd_stage_starts_from_the_given_sft_student(wiring_world, tmp_path):
    """ADPA+ = SFT student → DCKD → ADPA (adpa_dckd.md Alg. 2): with a ready SFT student (params.sft_model) the
    DCKD stage trains from it — one SGD step of DCKD's loss with π_dpo from that checkpoint — as the dckd
    recipe itself does with the same parameter."""
    import json
    from pathlib import Path

    world = wiring_world
    overrides = {**GEN, "dpo_teacher": str(world.dpo_teacher), "sft_model": str(world.student_sft),
                 "dckd_settings": dict(STEP)}
    params = ref.resolved("adpa_plus", overrides)
    result = ref.run(world, tmp_path, "adpa_plus", world.prefs, overrides)
    stage = Path(json.loads((result.run.path / "stages.json").read_text())["dckd_student"]["path"]) / "model"
    rows = ref.rows_of(world.prefs)
    batches = _pairs(world, rows, [(r["chosen"], True) for r in rows], [(r["rejected"], True) for r in rows])
    policy = ref.load64(world.student_sft)
    dckd_params = {"alpha": params["alpha"], "kl_reduction": params["kl_reduction"], "temperature": params["temperature"]}
    loss = _dckd_loss(dckd_params, policy, ref.load64(world.dpo_teacher), batches, len(world.tokenizer))
    ref.assert_one_sgd_step(world.student_sft, stage, policy, loss)


def test_adpa_plus_builds_the_sft_student_its_dckd_stage_starts_from(wiring_world, tmp_path):
    world = wiring_world
    overrides = {**GEN, "dpo_teacher": str(world.dpo_teacher), "dckd_settings": dict(STEP),
                 "sft_settings": dict(STEP)}
    ref.run(world, tmp_path, "adpa_plus", world.prefs, overrides)
    assert list((tmp_path / "cache").rglob("sft-model*")), "no SFT student was built for the DCKD stage"
