"""MiniLLM's rollout buffer: a round of rollouts, consumed as minibatches over several PPO inner epochs.

MiniLLM (Gu et al. 2024, §2.3 and the authors' ``minillm/`` trainer) samples ``num_rollouts`` responses with
the current student (mixed with the teacher), stores them with everything computed at sampling time
(old log-probs, importance weights, advantages), then runs ``ppo_epochs`` passes over them in shuffled
minibatches before sampling again. The buffer is a plain object with ``state_dict()`` / ``load_state_dict()``:
a checkpoint taken between two minibatches resumes at the same minibatch of the same epoch, with the same
rollouts and the same shuffles (its own seeded ``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Mapping

from kdbench.errors import ConfigError
from kdbench.train.replay import split_batch, stack_items


class RolloutBuffer:
    """One round of rollouts and the cursor over its PPO inner epochs.

    Fill with :meth:`add` (any number of generation batches), then call :meth:`next_minibatch` until it
    returns ``None`` (all ``ppo_epochs`` passes done; :attr:`needs_rollouts` is then True and the next
    :meth:`add` starts a new round). Each epoch visits every rollout once, in an order drawn at the start of
    the epoch; the last minibatch of an epoch may be smaller.
    """

    def __init__(self, *, ppo_epochs: int = 4, minibatch_size: int = 8, seed: int = 0,
                 pad_values: Mapping | None = None):
        import torch

        if int(ppo_epochs) < 1 or int(minibatch_size) < 1:
            raise ConfigError(f"ppo_epochs and minibatch_size must be at least 1 (got {ppo_epochs}, {minibatch_size}).")
        self.ppo_epochs = int(ppo_epochs)
        self.minibatch_size = int(minibatch_size)
        self.pad_values = dict(pad_values or {})
        self._generator = torch.Generator()
        self._generator.manual_seed(int(seed))
        self._items: list[dict] = []
        self._epoch = 0
        self._position = 0
        self._order: list[int] = []
        self._consuming = False
        self.rounds = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def needs_rollouts(self) -> bool:
        """True before the first round and after the last minibatch of the last epoch of a round."""
        return not self._consuming and (not self._items or self._epoch >= self.ppo_epochs)

    @property
    def epoch(self) -> int:
        return self._epoch

    def add(self, batch: Mapping) -> None:
        """Store the rows of a batch dict of [N, ...] tensors as rollouts of the current round (a finished
        round is discarded first: rollouts are used for exactly ``ppo_epochs`` passes)."""
        if self._consuming:
            raise ConfigError("the current round of rollouts is not used up yet; finish its PPO epochs first.")
        if self._items and self._epoch >= self.ppo_epochs:
            self._items, self._epoch, self._position, self._order = [], 0, 0, []
        self._items.extend(split_batch(batch))

    def _start_epoch(self) -> None:
        import torch

        self._order = torch.randperm(len(self._items), generator=self._generator).tolist()
        self._position = 0

    def next_minibatch(self) -> dict | None:
        """The next minibatch (stacked, padded), or ``None`` when the round's epochs are done."""
        if not self._consuming:
            if not self._items or self._epoch >= self.ppo_epochs:
                return None
            self._consuming = True
            self._start_epoch()
        rows = self._order[self._position:self._position + self.minibatch_size]
        self._position += len(rows)
        batch = stack_items([self._items[i] for i in rows], self.pad_values)
        if self._position >= len(self._order):
            self._epoch += 1
            if self._epoch < self.ppo_epochs:
                self._start_epoch()
            else:
                self._consuming = False
                self.rounds += 1
        return batch

    def state_dict(self) -> dict:
        return {"ppo_epochs": self.ppo_epochs, "minibatch_size": self.minibatch_size,
                "items": [dict(item) for item in self._items], "epoch": self._epoch, "position": self._position,
                "order": list(self._order), "consuming": self._consuming, "rounds": self.rounds,
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["ppo_epochs"]) != self.ppo_epochs or int(state["minibatch_size"]) != self.minibatch_size:
            raise ConfigError(f"the checkpoint's rollout buffer runs {state['ppo_epochs']} PPO epochs of minibatches "
                              f"of {state['minibatch_size']}, this run {self.ppo_epochs} of {self.minibatch_size}; "
                              "resume with the same settings.")
        self._items = [dict(item) for item in state["items"]]
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = [int(i) for i in state["order"]]
        self._consuming, self.rounds = bool(state["consuming"]), int(state["rounds"])
        self._generator.set_state(state["generator"])
