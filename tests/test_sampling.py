"""Flat mini-batch sampling gives d3rlpy's own batches, bit for bit, and the same training."""

from __future__ import annotations

import d3rlpy
import numpy as np
import pytest
import torch
from conftest import neorl_arrays, quiet_fit

from lmencoders.datasets import NeoRLData, to_mdp_dataset
from lmencoders.sampling import FlatReplayBuffer, flat_sampling

FIELDS = ("observations", "actions", "rewards", "next_observations", "next_actions")


@pytest.fixture(scope="module")
def neorl_dataset() -> d3rlpy.dataset.ReplayBuffer:
    """Real Hopper rollouts in NeoRL's layout: episodes that fall (terminal) and time-outs."""
    data = to_mdp_dataset(NeoRLData.from_stored(neorl_arrays(8, steps=40), "rollouts.npz"))
    ends = {ep.terminated for ep in data.episodes}
    assert ends == {True, False}  # both kinds of ending are exercised
    return data


def batches(buffer, seed: int, count: int = 5, size: int = 64):
    np.random.seed(seed)
    return [buffer.sample_transition_batch(size) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_batches_are_d3rlpys_bit_for_bit(neorl_dataset, seed):
    flat = flat_sampling(neorl_dataset)
    assert isinstance(flat, FlatReplayBuffer) and flat.buffer is neorl_dataset.buffer
    terminal_drawn = False
    for ours, theirs in zip(batches(flat, seed), batches(neorl_dataset, seed)):
        for field in (*FIELDS, "terminals", "intervals"):
            a, b = getattr(ours, field), getattr(theirs, field)
            assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, field
            assert np.array_equal(a, b), field
        terminal_drawn |= bool(ours.terminals.any())
        # the Transition objects, for what reads them (returns-to-go), built on demand
        for mine, picked in zip(ours.transitions, theirs.transitions):
            assert np.array_equal(mine.rewards_to_go, picked.rewards_to_go)
            assert np.array_equal(mine.next_observation, picked.next_observation)
    assert terminal_drawn  # terminal steps were drawn: zero next observations and actions


def test_training_on_flat_batches_is_unchanged(neorl_dataset):
    def trained(buffer) -> list[torch.Tensor]:
        d3rlpy.seed(3)
        algo = d3rlpy.algos.TD3PlusBCConfig(batch_size=32).create(device="cpu")
        quiet_fit(algo, buffer, steps=10)
        return [p.detach().clone() for p in algo.impl.modules.policy.parameters()]

    for ours, theirs in zip(trained(flat_sampling(neorl_dataset)), trained(neorl_dataset)):
        assert torch.equal(ours, theirs)


def test_other_transition_pickers_keep_d3rlpys_sampling(neorl_dataset):
    class Shifted(d3rlpy.dataset.BasicTransitionPicker):
        def __call__(self, episode, index):
            picked = super().__call__(episode, index)
            return d3rlpy.dataset.Transition(**{**vars(picked), "interval": 2})

    buffer = d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(),
        episodes=neorl_dataset.episodes,
        transition_picker=Shifted(),
    )
    (batch,) = batches(flat_sampling(buffer), seed=0, count=1)
    assert (batch.intervals == 2).all()  # the picker's transitions, not the flat layout's
    fifo = d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.FIFOBuffer(limit=100), episodes=neorl_dataset.episodes
    )
    assert flat_sampling(fifo)._flat_layout() is None  # its transitions change at one count


def test_a_grown_buffer_is_laid_out_again(neorl_dataset):
    buffer = d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(), episodes=neorl_dataset.episodes[:2]
    )
    flat = flat_sampling(buffer)
    batches(flat, seed=0, count=1)
    for episode in neorl_dataset.episodes[2:]:
        buffer.append_episode(episode)
    for ours, theirs in zip(batches(flat, seed=1), batches(buffer, seed=1)):
        assert all(np.array_equal(getattr(ours, f), getattr(theirs, f)) for f in FIELDS)
