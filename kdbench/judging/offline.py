"""The offline judge: deterministic, reference-based, and never presented as an LLM judgment.

It stands behind the same pairwise interface as the LLM judge (``compare(question, answer_a, answer_b,
references) -> "A" | "B" | "tie"``), for tests, CI and the embedded synthetic benchmark:

* ``exact`` (the synthetic benchmark, where every prompt has a unique correct answer): an answer wins when
  it equals a reference after :func:`kdbench.metrics.normalize_answer` and the other does not; both or
  neither correct is a tie. On that benchmark this *is* the correct verdict.
* ``rouge`` (open-ended suites such as Dolly or Vicuna): a *similarity-to-reference proxy*. The answer whose
  Rouge-L F-measure against the references (max over references) is higher by more than ``tie_margin``
  wins; otherwise a tie. It measures closeness to one human reference, not quality, and every report
  labels it so.

The judge is symmetric (swapping A and B swaps the verdict), so both orders always agree. Its labels (shown
next to every number it produces) and the default tie margin come from ``judges/offline.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdbench.errors import ConfigError, DataError

def modes() -> dict[str, dict]:
    """``judges/offline.yaml``'s modes: ``{mode: {label, tie_margin?}}``."""
    from kdbench import registry

    return registry.get("judges", "offline").body["modes"]


@dataclass(frozen=True)
class OfflineJudge:
    """Deterministic pairwise judge; ``mode`` is ``"exact"`` or ``"rouge"``; ``tie_margin`` (Rouge-L F units,
    0-1: differences this small are ties) defaults to the judge file's."""

    mode: str = "rouge"
    tie_margin: float | None = None

    def __post_init__(self):
        known = modes()
        if self.mode not in known:
            raise ConfigError(f"Offline judge mode must be one of {', '.join(known)}, not {self.mode!r}.")
        if self.tie_margin is None:
            object.__setattr__(self, "tie_margin", float(known[self.mode].get("tie_margin", 0.0)))
        if not 0 <= self.tie_margin < 1:
            raise ConfigError(f"The offline judge's tie margin must be in [0, 1), not {self.tie_margin:g}.")

    @property
    def label(self) -> str:
        return modes()[self.mode]["label"]

    def name(self) -> str:
        return f"offline-{self.mode}" + (f"-margin{self.tie_margin:g}" if self.mode == "rouge" else "")

    def score(self, answer: str, references: Sequence[str]) -> float:
        """Exact: 1.0 / 0.0; rouge: max Rouge-L F over the references."""
        from kdbench.metrics import normalize_answer, rouge_l

        if self.mode == "exact":
            normalized = normalize_answer(answer)
            return 1.0 if any(normalized == normalize_answer(ref) for ref in references) else 0.0
        return max(rouge_l(answer, ref) for ref in references)

    def compare(self, question: str, answer_a: str, answer_b: str, references: Sequence[str] | None) -> str:
        """``"A"``, ``"B"`` or ``"tie"`` (``question`` is unused: the verdict depends on the references only)."""
        if not references:
            raise DataError("The offline judge needs reference answers for every prompt; pass --references "
                            "or use generations that carry them.")
        score_a, score_b = self.score(answer_a, references), self.score(answer_b, references)
        margin = 0.0 if self.mode == "exact" else self.tie_margin
        if score_a - score_b > margin:
            return "A"
        if score_b - score_a > margin:
            return "B"
        return "tie"
