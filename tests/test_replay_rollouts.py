"""DistiLLM's replay buffer and adaptive SGO scheduler, MiniLLM's rollout buffer: behaviour, and a checkpoint
(state_dict through torch.save / torch.load(weights_only=True)) resumes bit-exactly."""

from __future__ import annotations

import io

import pytest
import torch

from kdbench.errors import ConfigError
from kdbench.train.replay import AdaptiveSGOScheduler, ReplayBuffer
from kdbench.train.rollouts import RolloutBuffer


def through_disk(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def generation_batch(step: int, n: int = 3, length: int | None = None):
    g = torch.Generator().manual_seed(1000 + step)
    length = length or 4 + step % 3
    ids = torch.randint(0, 50, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "old_logps": torch.randn(n, length, generator=g, dtype=torch.float64)}


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ replay buffer


def test_replay_buffer_is_fifo_and_samples_without_replacement():
    buffer = ReplayBuffer(capacity=5, seed=0)
    buffer.add(generation_batch(0, n=3, length=4))
    assert len(buffer) == 3 and not buffer.full
    buffer.add(generation_batch(1, n=4, length=6))
    assert len(buffer) == 5 and buffer.full
    stored = buffer.state_dict()["items"]
    # The two oldest rows were evicted; the remaining first row is row 2 of the first batch.
    assert torch.equal(stored[0]["input_ids"], generation_batch(0, n=3, length=4)["input_ids"][2])
    sample = buffer.sample(5)
    assert sample["input_ids"].shape == (5, 6)
    rows = {tuple(r.tolist()) for r in sample["input_ids"]}
    assert len(rows) == 5  # without replacement
    short = [i for i in range(5) if int(sample["attention_mask"][i].sum()) == 4]
    assert short and all(bool((sample["labels"][i, 4:] == -100).all()) for i in short)  # padded labels ignored
    with pytest.raises(ConfigError):
        buffer.sample(6)
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=0)


def replay_run(buffer: ReplayBuffer, steps: range):
    out = []
    for step in steps:
        buffer.add(generation_batch(step))
        if len(buffer) >= 4:
            out.append(buffer.sample(4))
    return out


def test_replay_buffer_resumes_bit_exactly():
    uninterrupted = replay_run(ReplayBuffer(capacity=7, seed=3), range(10))
    first = ReplayBuffer(capacity=7, seed=3)
    head = replay_run(first, range(4))
    resumed = ReplayBuffer(capacity=7, seed=999)  # the seed is overwritten by the checkpoint
    resumed.load_state_dict(through_disk(first.state_dict()))
    tail = replay_run(resumed, range(4, 10))
    assert len(head + tail) == len(uninterrupted)
    for a, b in zip(head + tail, uninterrupted):
        assert_batches_equal(a, b)
    with pytest.raises(ConfigError):
        ReplayBuffer(capacity=8).load_state_dict(first.state_dict())


# ------------------------------------------------------------------ adaptive SGO scheduler


def test_scheduler_raises_probability_only_when_validation_loss_rises_by_epsilon():
    scheduler = AdaptiveSGOScheduler()
    assert scheduler.probability == 0.0
    assert not scheduler.update(2.0)  # the first loss is the reference
    assert not scheduler.update(2.05)  # within ε = 0.1
    assert scheduler.update(2.1) and scheduler.probability == pytest.approx(0.1)
    assert not scheduler.update(2.15)  # the reference moved to 2.1
    assert not scheduler.update(1.0)  # a fall never lowers φ or the reference
    assert scheduler.update(2.25) and scheduler.probability == pytest.approx(0.2)
    for loss in range(3, 20):
        scheduler.update(float(loss))
    assert scheduler.probability == 1.0


def test_scheduler_choices_follow_the_authors_rule():
    scheduler = AdaptiveSGOScheduler(initial_probability=0.0)
    assert {scheduler.choose(s, 100, buffer_full=False) for s in range(50)} == {"gold"}
    scheduler = AdaptiveSGOScheduler(initial_probability=1.0, seed=0)
    # Buffer not full: every student step generates fresh outputs.
    assert {scheduler.choose(s, 100, buffer_full=False) for s in range(50)} == {"fresh"}
    # Buffer full, decreasing schedule: fresh with probability 1 − step/total, replay otherwise.
    early = [scheduler.choose(5, 100, buffer_full=True) for _ in range(400)]
    late = [scheduler.choose(95, 100, buffer_full=True) for _ in range(400)]
    assert early.count("fresh") > 340 and late.count("replay") > 340 and "gold" not in early + late
    half = AdaptiveSGOScheduler(initial_probability=0.5, replay_ratio="constant", seed=1)
    picks = [half.choose(10, 100, buffer_full=True) for _ in range(2000)]
    assert abs(picks.count("gold") / 2000 - 0.5) < 0.05 and abs(picks.count("fresh") / 2000 - 0.25) < 0.04
    assert half.fresh_threshold(10, 100) == 0.25
    increasing = AdaptiveSGOScheduler(initial_probability=0.8, replay_ratio="increasing")
    assert increasing.fresh_threshold(25, 100) == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        AdaptiveSGOScheduler(replay_ratio="sometimes")


def scheduler_run(scheduler, steps):
    out = []
    for step in steps:
        if step % 5 == 0:
            scheduler.update(1.0 + 0.2 * step)
        out.append((scheduler.choose(step, 40, buffer_full=step > 12), scheduler.probability))
    return out


def test_scheduler_resumes_bit_exactly():
    uninterrupted = scheduler_run(AdaptiveSGOScheduler(seed=5), range(40))
    first = AdaptiveSGOScheduler(seed=5)
    head = scheduler_run(first, range(17))
    resumed = AdaptiveSGOScheduler(seed=0)
    resumed.load_state_dict(through_disk(first.state_dict()))
    assert head + scheduler_run(resumed, range(17, 40)) == uninterrupted
    assert {choice for choice, _ in uninterrupted} == {"gold", "fresh", "replay"}


# ------------------------------------------------------------------ rollout buffer


def test_rollout_buffer_runs_ppo_epochs_over_every_rollout():
    buffer = RolloutBuffer(ppo_epochs=3, minibatch_size=4, seed=0)
    assert buffer.needs_rollouts and buffer.next_minibatch() is None
    buffer.add(generation_batch(0, n=5, length=4))
    buffer.add(generation_batch(1, n=5, length=4))
    assert len(buffer) == 10
    seen = [buffer.next_minibatch()["input_ids"]]
    with pytest.raises(ConfigError):  # rollouts are used for all their epochs before new ones come in
        buffer.add(generation_batch(9))
    while (batch := buffer.next_minibatch()) is not None:
        seen.append(batch["input_ids"])
    assert [len(b) for b in seen] == [4, 4, 2] * 3
    all_rows = torch.cat([generation_batch(step, n=5, length=4)["input_ids"] for step in (0, 1)])
    for epoch in range(3):
        rows = torch.cat(seen[3 * epoch:3 * epoch + 3])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, all_rows.tolist()))
    assert torch.cat(seen[0:3]).tolist() != torch.cat(seen[3:6]).tolist()  # each epoch reshuffles
    assert buffer.needs_rollouts and buffer.rounds == 1
    buffer.add(generation_batch(2, n=2))
    assert len(buffer) == 2  # a new round replaces the used one


def rollout_run(buffer, rounds):
    out = []
    for r in rounds:
        if buffer.needs_rollouts:
            buffer.add(generation_batch(r, n=5))
        for _ in range(3):  # stop partway through the epochs: a checkpoint can fall anywhere
            batch = buffer.next_minibatch()
            if batch is None:
                break
            out.append(batch)
    return out


def test_rollout_buffer_resumes_mid_epoch_bit_exactly():
    uninterrupted = rollout_run(RolloutBuffer(ppo_epochs=2, minibatch_size=2, seed=7), range(12))
    first = RolloutBuffer(ppo_epochs=2, minibatch_size=2, seed=7)
    head = rollout_run(first, range(5))
    assert not first.needs_rollouts  # the checkpoint falls inside a round
    resumed = RolloutBuffer(ppo_epochs=2, minibatch_size=2, seed=1)
    resumed.load_state_dict(through_disk(first.state_dict()))
    tail = rollout_run(resumed, range(5, 12))
    assert len(head + tail) == len(uninterrupted)
    for a, b in zip(head + tail, uninterrupted):
        assert_batches_equal(a, b)
    with pytest.raises(ConfigError):
        RolloutBuffer(ppo_epochs=3, minibatch_size=2).load_state_dict(first.state_dict())
