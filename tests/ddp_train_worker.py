"""Run by test_distributed.py under torchrun: TD3+BC with an ln_embed LM encoder under DDP."""

from __future__ import annotations

import sys

import d3rlpy
import torch
from conftest import hopper_rollouts

import lmencoders


def main(model: str, out: str) -> None:
    rank = d3rlpy.distributed.init_process_group("gloo")
    d3rlpy.seed(rank)  # different batches per process: only gradient averaging keeps them equal
    obs, actions, rewards, terminals, timeouts = hopper_rollouts(episodes=3, steps=20)
    dataset = d3rlpy.dataset.MDPDataset(
        obs, actions, rewards, terminals, timeouts, action_space=d3rlpy.ActionSpace.CONTINUOUS
    )
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    factory = lmencoders.LMEncoderFactory(
        description="hopper",
        model=model,
        tuning="ln_embed",
        hidden_units=[32, 32],
        observation_scaler=scaler,
    )
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=factory,
        critic_encoder_factory=factory,
        observation_scaler=scaler,
        batch_size=8,
    ).create(device="cpu", enable_ddp=True)
    algo.fit(
        dataset,
        n_steps=4,
        n_steps_per_epoch=4,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )
    policy = d3rlpy.torch_utility.unwrap_ddp_model(algo.impl.modules.policy)
    torch.save({k: v.detach() for k, v in policy.state_dict().items()}, f"{out}.rank{rank}")
    d3rlpy.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
