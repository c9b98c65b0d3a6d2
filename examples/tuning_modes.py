"""Each tuning mode of the LM encoder: what trains, what it costs per update, what it saves.

python examples/tuning_modes.py --updates 3 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import d3rlpy

import lmencoders
from lmencoders.datasets import read_neorl_file, shipped_dataset, to_mdp_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    dataset = to_mdp_dataset(read_neorl_file(shipped_dataset()))

    for tuning in lmencoders.TUNING_MODES:
        scaler = d3rlpy.preprocessing.StandardObservationScaler()
        factory = lmencoders.LMEncoderFactory(
            description="hopper", tuning=tuning, observation_scaler=scaler
        )
        if tuning == "frozen":
            factory.precompute(dataset, show_progress=False)
        algo = d3rlpy.algos.TD3PlusBCConfig(
            actor_encoder_factory=factory,
            critic_encoder_factory=factory,
            observation_scaler=scaler,
            batch_size=args.batch_size,
            # critics sharing one encoder run a tuned LM once per batch instead of twice
            q_func_factory=d3rlpy.models.MeanQFunctionFactory(share_encoder=True),
        ).create(device="cpu")
        algo.fit(
            dataset,
            n_steps=1,
            n_steps_per_epoch=1,
            show_progress=False,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        )
        start = time.perf_counter()
        for _ in range(args.updates):
            algo.update(dataset.sample_transition_batch(args.batch_size))
        seconds = (time.perf_counter() - start) / args.updates
        trained = sum(
            p.numel()
            for name, p in algo.impl.modules.policy.named_parameters()
            if "lm_parameters" in name
        )
        with tempfile.TemporaryDirectory() as tmp:
            algo.save(os.path.join(tmp, "m.d3"))
            size = os.path.getsize(os.path.join(tmp, "m.d3")) / 2**20
        print(
            f"{tuning:9s} {seconds * 1e3:9.1f} ms/update  trained LM tensors per encoder: "
            f"{trained:>10,d}  checkpoint {size:7.1f} MB"
        )


if __name__ == "__main__":
    main()
