"""Mini-batches of an offline dataset as a few array gathers.

d3rlpy's ``ReplayBuffer.sample_transition_batch`` picks each of a batch's transitions in
Python (256 picks, each building a ``Transition`` with its own next observation, next action
and rewards-to-go slice) and then stacks them: on a CPU that is about a fifth of a plain TD3+BC
step. An offline dataset does not change while it trains, so its transitions can be laid out
once as row indices into one observation array. ``FlatReplayBuffer`` draws the same random
indices as d3rlpy (one ``np.random.randint`` per transition, which NumPy's legacy generator
serves identically as one vectorised call) and gathers them, so it gives the same batches, bit
for bit, and training is unchanged. ``Transition`` objects are built only if something reads
``batch.transitions`` (d3rlpy's returns-to-go, for Cal-QL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from d3rlpy.dataset import (
    BasicTransitionPicker,
    InfiniteBuffer,
    ReplayBuffer,
    ReplayBufferBase,
    Transition,
    TransitionMiniBatch,
)

__all__ = ["FlatReplayBuffer", "flat_sampling"]


class _Layout:
    """Every transition of a buffer as row indices into one observation and action array
    (a zero row last, for the next observation and action of terminal steps)."""

    def __init__(self, buffer: ReplayBufferBase) -> None:
        episodes = buffer.episodes
        starts = np.cumsum([0] + [len(ep.observations) for ep in episodes])
        action_starts = np.cumsum([0] + [len(ep.actions) for ep in episodes])
        where = {id(ep): i for i, ep in enumerate(episodes)}
        count = buffer.transition_count
        episode_of = np.empty(count, dtype=np.int64)
        step = np.empty(count, dtype=np.int64)
        for i in range(count):
            episode, index = buffer.buffer[i]
            episode_of[i], step[i] = where[id(episode)], index
        sizes = np.array([ep.size() for ep in episodes])[episode_of]
        terminated = np.array([ep.terminated for ep in episodes])[episode_of]
        terminal = terminated & (step == sizes - 1)
        zero_row, zero_action = starts[-1], action_starts[-1]
        observations = [np.asarray(ep.observations) for ep in episodes]
        actions = [np.asarray(ep.actions) for ep in episodes]
        self.observations = np.concatenate([*observations, np.zeros_like(observations[0][:1])])
        self.actions = np.concatenate([*actions, np.zeros_like(actions[0][:1])])
        self.rewards = np.concatenate([np.asarray(ep.rewards) for ep in episodes])
        self.row = starts[episode_of] + step
        self.next_row = np.where(terminal, zero_row, self.row + 1)
        self.action = action_starts[episode_of] + step
        self.next_action = np.where(terminal, zero_action, self.action + 1)
        self.terminal = terminal.astype(np.float32).reshape(-1, 1)
        self.count = count


class _PickedTransitions(Sequence[Transition]):
    """The ``Transition`` objects of a batch, built when read (most algorithms never do)."""

    def __init__(self, buffer: ReplayBufferBase, indices: np.ndarray) -> None:
        self._buffer, self._indices = buffer, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, k: int | slice) -> Transition | list[Transition]:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        episode, index = self._buffer.buffer[int(self._indices[k])]
        return self._buffer.transition_picker(episode, index)


class FlatReplayBuffer(ReplayBuffer):
    """A d3rlpy ``ReplayBuffer`` over the same episodes whose transition batches are array
    gathers: for offline training, on an ``InfiniteBuffer`` (the layout is made again when
    the buffer has grown); other buffers keep d3rlpy's sampling."""

    _layout: _Layout | None = None

    @classmethod
    def of(cls, source: ReplayBufferBase) -> FlatReplayBuffer:
        """A view of ``source``: the same episodes and picker, nothing copied but arrays."""
        info = source.dataset_info
        return cls(
            source.buffer,
            transition_picker=source.transition_picker,
            trajectory_slicer=source.trajectory_slicer,
            observation_signature=info.observation_signature,
            action_signature=info.action_signature,
            reward_signature=info.reward_signature,
            action_space=info.action_space,
            action_size=info.action_size,
        )

    def sample_transition_batch(self, batch_size: int) -> TransitionMiniBatch:
        layout = self._flat_layout()
        if layout is None:
            return super().sample_transition_batch(batch_size)
        indices = np.random.randint(layout.count, size=batch_size)  # d3rlpy's draws
        action, next_action = layout.action[indices], layout.next_action[indices]
        return TransitionMiniBatch(
            observations=layout.observations[layout.row[indices]].astype(np.float32),
            actions=layout.actions[action].astype(np.float32),
            rewards=layout.rewards[action].astype(np.float32),
            next_observations=layout.observations[layout.next_row[indices]].astype(np.float32),
            next_actions=layout.actions[next_action].astype(np.float32),
            terminals=layout.terminal[indices],
            intervals=np.ones((batch_size, 1), dtype=np.float32),
            transitions=_PickedTransitions(self, indices),
        )

    def _flat_layout(self) -> _Layout | None:
        """The layout for the buffer as it is now; ``None`` where the flat batch would differ
        from d3rlpy's (another transition picker, tuple observations) or where a layout would
        go stale unnoticed (a FIFO buffer replaces transitions at the same count)."""
        if type(self.transition_picker) is not BasicTransitionPicker:
            return None
        if not isinstance(self.buffer, InfiniteBuffer):
            return None
        if len(self.dataset_info.observation_signature.shape) != 1:
            return None
        if self._layout is None or self._layout.count != self.transition_count:
            self._layout = _Layout(self)
        return self._layout


def flat_sampling(buffer: ReplayBufferBase) -> ReplayBufferBase:
    """``buffer`` with flat sampling where it applies (a plain ``ReplayBuffer``)."""
    if isinstance(buffer, FlatReplayBuffer) or not isinstance(buffer, ReplayBuffer):
        return buffer
    return FlatReplayBuffer.of(buffer)
