"""kdbench.losses: every distillation objective of kdbench as a pure function (no model code).

Definitions and decisions: ``docs/methods.md`` (and ``METHODS.md`` of the spec).

* Token-level divergences, one signature ``fn(student_logits, teacher_logits, mask=None, *,
  temperature=1.0, reduction="mean", **params)``: :func:`fkl`, :func:`rkl`, :func:`fkl_rkl`,
  :func:`jsd`, :func:`tvd`, :func:`skl`, :func:`srkl`, :func:`akl`, :func:`akl_r`
  (by name: :data:`DIVERGENCES`, or :func:`divergence_loss`). ``teacher_logits`` may be a
  :class:`SparseTeacher` (top-k). Each divergence is one :class:`Divergence` record (row math, parameter
  defaults and checks, closed-form gradient); :func:`register_divergence` adds one.
* Sequence log-probs: :func:`token_logps`, :func:`sequence_logps`, :func:`cross_entropy`.
* Preference losses on sequence log-probs: :func:`dpo`, :func:`ipo`, :func:`simpo`, :func:`cpo`,
  :func:`dpkd`, :func:`dadpo` (by the name a recipe uses: :data:`kdbench.train.preference_forms.PREFERENCE_FORMS`).
* Teacher-guided: :func:`adpa`, :func:`dckd`, :func:`dpkd_token`.
* Fused (logits never materialized): :func:`fused_token_loss`.
* Policy gradient (MiniLLM, DPPO; :mod:`kdbench.losses.policy_gradient`, :mod:`kdbench.losses.dppo`):
  :func:`minillm`, :func:`ppo_clipped_objective`, :func:`dppo`, their rewards and advantages.
* Contrastive (DistiLLM-2; :mod:`kdbench.losses.contrastive`): :func:`distillm2` and its curriculum.
* Second tier, sequence level: :func:`wpo` (+ :func:`wpo_log_weight`), :func:`plad`, :func:`ddpo_rm`,
  :func:`dkto` (+ :func:`kto_reference_point`, :func:`mismatched_order`); token level: :func:`atkd`
  (+ :func:`atkd_uncertainty`, :func:`atkd_threshold`), :func:`q_argmax_kd`, :func:`q_softmax_kd`, :func:`q_kd_term`.
* Across tokenizers: :func:`uld`, :func:`dskd` and the alignments :func:`rank_alignment`,
  :func:`prefix_alignment`, :func:`token_offsets`, :func:`alignment_scores_from_pairs`,
  :func:`cross_model_attention_scores`.
"""

from kdbench.losses.contrastive import distillm2, distillm2_adaptive_alpha, distillm2_beta, response_mean_logps
from kdbench.losses.cross_tokenizer import (alignment_scores_from_pairs, cross_model_attention_scores, dskd,
                                            prefix_alignment, rank_alignment, token_offsets, uld)
from kdbench.losses.divergences import (Divergence, akl_weights, get_divergence, register_divergence,
                                        unregister_divergence)
from kdbench.losses.dppo import (clipped_value_loss, critic_free_advantages, dpo_implicit_rewards, dppo,
                                 gae_advantages, kl_penalized_rewards)
from kdbench.losses.fused import fused_token_loss
from kdbench.losses.guided import adpa, dckd, dpkd_token
from kdbench.losses.policy_gradient import (minillm, minillm_advantages, minillm_rewards, mixed_importance_weights,
                                            ppo_clipped_objective, reward_to_go, teacher_mixed_logprobs)
from kdbench.losses.sequence import (
    cpo,
    cross_entropy,
    dadpo,
    dpkd,
    dpo,
    ipo,
    sequence_logps,
    simpo,
    token_logps,
)
from kdbench.losses.second_tier import ddpo_rm, dkto, kto_reference_point, mismatched_order, plad, wpo, wpo_log_weight
from kdbench.losses.second_tier_token import (atkd, atkd_threshold, atkd_uncertainty, q_argmax_kd, q_kd_term,
                                              q_softmax_kd)
from kdbench.losses.sparse import SparseTeacher
from kdbench.losses.token import (
    DIVERGENCES,
    akl,
    akl_r,
    divergence_loss,
    fkl,
    fkl_rkl,
    jsd,
    rkl,
    skl,
    srkl,
    tvd,
)

__all__ = [
    "DIVERGENCES", "SparseTeacher", "Divergence", "divergence_loss", "get_divergence",
    "register_divergence", "unregister_divergence",
    "fkl", "rkl", "fkl_rkl", "jsd", "tvd", "skl", "srkl", "akl", "akl_r", "akl_weights",
    "token_logps", "sequence_logps", "cross_entropy",
    "dpo", "ipo", "simpo", "cpo", "dpkd", "dadpo",
    "adpa", "dckd", "dpkd_token", "fused_token_loss",
    "minillm", "minillm_advantages", "minillm_rewards", "mixed_importance_weights", "ppo_clipped_objective",
    "reward_to_go", "teacher_mixed_logprobs",
    "dppo", "dpo_implicit_rewards", "kl_penalized_rewards", "gae_advantages", "critic_free_advantages",
    "clipped_value_loss",
    "distillm2", "distillm2_beta", "distillm2_adaptive_alpha", "response_mean_logps",
    "wpo", "wpo_log_weight", "plad", "ddpo_rm", "dkto", "kto_reference_point", "mismatched_order",
    "atkd", "atkd_uncertainty", "atkd_threshold", "q_argmax_kd", "q_softmax_kd", "q_kd_term",
    "uld", "dskd", "rank_alignment", "prefix_alignment", "token_offsets", "alignment_scores_from_pairs",
    "cross_model_attention_scores",
]
