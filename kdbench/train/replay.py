"""DistiLLM's sampling state: the replay buffer of student-generated outputs and the adaptive scheduler of
student-generated outputs (SGO). Both are plain objects with ``state_dict()`` / ``load_state_dict()`` so a
checkpoint saves them and a resumed run continues bit-exactly (their randomness comes from their own seeded
``torch.Generator``, never from the global RNG).

Definitions (DistiLLM, Ko et al. ICML 2024, §3.2 "adaptive off-policy approach"; defaults from the authors'
``arguments.py`` and ``finetune.py``, read through the search tools; see docs/methods.md "DistiLLM"):

* the scheduler keeps a probability φ of training on student outputs (``init_threshold`` = 0). After each
  validation, when the validation loss rose by at least ε (``loss_eps`` = 0.1) over the last reference value,
  φ ← min(φ + δ, 1) (δ = 0.1) and the reference becomes the new loss;
* per step it draws u ~ U(0, 1): with u < φ·s(step) — s the replay-ratio schedule, ``decreasing`` =
  1 − step/total (default), ``increasing`` = step/total, ``constant`` = ½ — or with u < φ while the buffer is
  not yet full, the student generates fresh outputs (which enter the buffer and are trained on); otherwise
  with u < φ a batch is replayed from the buffer; otherwise the step trains on the gold data;
* the buffer holds the last ``capacity`` = 1000 student outputs (first in, first out) and replays a uniform
  sample without replacement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from kdbench.errors import ConfigError, DataError

REPLAY_RATIOS = ("decreasing", "increasing", "constant")
SGO_SOURCES = ("gold", "fresh", "replay")
DEFAULT_PAD_VALUES = {"labels": -100, "attention_mask": 0}


def _generator(seed: int):
    import torch

    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def split_batch(batch: Mapping) -> list[dict]:
    """A batch dict of tensors sharing dim 0 → one dict of detached CPU tensors per row."""
    if not batch:
        raise DataError("a batch to store must hold at least one tensor.")
    sizes = {name: int(value.shape[0]) for name, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"every tensor of a stored batch must have the same number of rows (got {sizes}).")
    n = next(iter(sizes.values()))
    return [{name: value[i].detach().cpu().clone() for name, value in batch.items()} for i in range(n)]


def stack_items(items: list, pad_values: Mapping | None = None) -> dict:
    """Stack per-row dicts into a batch, right-padding dim 0 of each row to the longest one with
    ``pad_values[name]`` (default: ``labels`` −100, everything else 0)."""
    import torch

    pads = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    out = {}
    for name in items[0]:
        rows = [item[name] for item in items]
        if rows[0].dim() == 0:
            out[name] = torch.stack(rows)
            continue
        length = max(int(row.shape[0]) for row in rows)
        padded = []
        for row in rows:
            missing = length - int(row.shape[0])
            if missing:
                fill = torch.full((missing, *row.shape[1:]), pads.get(name, 0), dtype=row.dtype)
                row = torch.cat([row, fill])
            padded.append(row)
        out[name] = torch.stack(padded)
    return out


class ReplayBuffer:
    """First-in-first-out store of the last ``capacity`` student outputs (one row of a batch each).

    ``add(batch)`` stores every row of a dict of [N, ...] tensors (on CPU); ``sample(batch_size)`` returns a
    dict of stacked tensors — a uniform sample without replacement drawn from the buffer's own generator.
    """

    def __init__(self, capacity: int = 1000, *, seed: int = 0, pad_values: Mapping | None = None):
        if int(capacity) < 1:
            raise ConfigError(f"replay buffer capacity must be at least 1 (got {capacity}).")
        self.capacity = int(capacity)
        self.pad_values = dict(pad_values or {})
        self._items: deque = deque(maxlen=self.capacity)
        self._generator = _generator(seed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def add(self, batch: Mapping) -> None:
        """Store each row of ``batch`` (evicting the oldest rows beyond capacity)."""
        self._items.extend(split_batch(batch))

    def sample(self, batch_size: int) -> dict:
        """``batch_size`` stored rows chosen uniformly without replacement, stacked (padded) into a batch."""
        import torch

        if not 1 <= batch_size <= len(self._items):
            raise ConfigError(f"cannot replay {batch_size} rows from a buffer holding {len(self._items)}; "
                              "fill it first or lower the batch size.")
        chosen = torch.randperm(len(self._items), generator=self._generator)[:batch_size].tolist()
        return stack_items([self._items[i] for i in chosen], self.pad_values)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: capacity, stored rows (oldest first), generator state."""
        return {"capacity": self.capacity, "items": [dict(item) for item in self._items],
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ConfigError(f"the checkpoint's replay buffer has capacity {state['capacity']} but this run "
                              f"asks for {self.capacity}; resume with the same capacity.")
        self._items = deque((dict(item) for item in state["items"]), maxlen=self.capacity)
        self._generator.set_state(state["generator"])


class AdaptiveSGOScheduler:
    """DistiLLM's adaptive SGO scheduler (module docstring): decides per step whether to train on gold data,
    on fresh student outputs or on replayed ones, and raises its probability φ when validation loss rises."""

    def __init__(self, *, initial_probability: float = 0.0, step_size: float = 0.1, loss_tolerance: float = 0.1,
                 replay_ratio: str = "decreasing", seed: int = 0):
        if not 0.0 <= initial_probability <= 1.0:
            raise ConfigError(f"the initial SGO probability must be in [0, 1] (got {initial_probability}).")
        if not step_size > 0:
            raise ConfigError(f"the SGO probability step must be > 0 (got {step_size}).")
        if replay_ratio not in REPLAY_RATIOS:
            raise ConfigError(f"replay_ratio must be one of {', '.join(REPLAY_RATIOS)} (got {replay_ratio!r}).")
        self.probability = float(initial_probability)
        self.step_size = float(step_size)
        self.loss_tolerance = float(loss_tolerance)
        self.replay_ratio = replay_ratio
        self.reference_loss: float | None = None
        self._generator = _generator(seed)

    def fresh_threshold(self, step: int, total_steps: int) -> float:
        """φ·s(step): the probability of generating fresh student outputs at ``step`` (0-based) of
        ``total_steps`` once the buffer is full."""
        if total_steps < 1 or not 0 <= step <= total_steps:
            raise ConfigError(f"step {step} must lie in [0, total_steps = {total_steps}].")
        progress = step / total_steps
        schedule = {"decreasing": 1.0 - progress, "increasing": progress, "constant": 0.5}[self.replay_ratio]
        return self.probability * schedule

    def choose(self, step: int, total_steps: int, buffer_full: bool) -> str:
        """``"gold"``, ``"fresh"`` (generate, store, train on them) or ``"replay"`` for this step; draws one
        uniform number from the scheduler's generator every call."""
        import torch

        draw = float(torch.rand((), generator=self._generator, dtype=torch.float64))
        if draw < self.fresh_threshold(step, total_steps) or (draw < self.probability and not buffer_full):
            return "fresh"
        if draw < self.probability:
            return "replay"
        return "gold"

    def update(self, validation_loss: float) -> bool:
        """Feed one validation loss; returns True when φ rose. The first loss only sets the reference."""
        loss = float(validation_loss)
        if loss != loss:
            raise DataError("the validation loss is NaN; the SGO scheduler cannot compare it.")
        if self.reference_loss is None:
            self.reference_loss = loss
            return False
        if loss >= self.reference_loss + self.loss_tolerance:
            self.probability = min(self.probability + self.step_size, 1.0)
            self.reference_loss = loss
            return True
        return False

    def state_dict(self) -> dict:
        return {"probability": self.probability, "reference_loss": self.reference_loss,
                "replay_ratio": self.replay_ratio, "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if state["replay_ratio"] != self.replay_ratio:
            raise ConfigError(f"the checkpoint's SGO scheduler uses replay_ratio {state['replay_ratio']!r}, this run "
                              f"{self.replay_ratio!r}; resume with the same setting.")
        self.probability = float(state["probability"])
        self.reference_loss = None if state["reference_loss"] is None else float(state["reference_loss"])
        self._generator.set_state(state["generator"])
