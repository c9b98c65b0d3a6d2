from __future__ import annotations

import numpy as np
import pytest

from lmencoders import envs
from lmencoders.envs import FinRLEnv, make_env, normalized_score


@pytest.fixture(scope="module")
def market():
    return FinRLEnv()  # NeoRL's real market file, shipped with the package


def test_reset_observation_is_the_first_trading_day(market):
    obs, _ = market.reset()
    assert obs.shape == (181,) and market.n == 30 and len(market.dates) == 231
    assert obs[0] == 1_000_000.0
    assert market.tickers[0] == "AAPL"
    assert obs[1] == pytest.approx(38.56256103515625)  # AAPL close on 2019-01-02
    assert (obs[31:61] == 0).all()  # no shares yet
    assert obs[61] == pytest.approx(-2.019903016628902)  # AAPL macd


def test_a_buy_costs_price_times_shares_plus_fee_and_reward_is_scaled_asset_change(market):
    obs, _ = market.reset()
    action = np.zeros(30, np.float32)
    action[0] = 0.5  # 50 shares of AAPL
    price0 = obs[1]
    next_obs, reward, terminated, truncated, _ = market.step(action)
    cash = 1_000_000.0 - price0 * 50 * 1.001
    assert next_obs[0] == pytest.approx(cash)
    assert next_obs[31] == 50
    assets_after = cash + 50 * next_obs[1]
    assert reward == pytest.approx((assets_after - 1_000_000.0) * 1e-4)
    assert not terminated and not truncated


def test_sells_come_first_and_buys_are_limited_by_cash(market):
    market.reset()
    market.cash = 1_000.0
    market.shares[1] = 10.0  # 10 AXP
    price = market.close[0]
    action = np.zeros(30, np.float32)
    action[1] = -1.0  # sell up to 100 AXP: only 10 held
    action[0] = 1.0  # buy up to 100 AAPL: limited to what the cash (after the sale) buys
    obs, *_ = market.step(action)
    cash_after_sale = 1_000.0 + 10 * price[1] * 0.999
    bought = cash_after_sale // price[0]
    assert obs[32] == 0 and obs[31] == bought
    assert obs[0] == pytest.approx(cash_after_sale - bought * price[0] * 1.001)


def test_selling_what_is_not_held_does_nothing(market):
    market.reset()
    obs, reward, *_ = market.step(-np.ones(30, np.float32))
    assert obs[0] == 1_000_000.0 and reward == 0.0


def test_an_episode_replays_the_whole_file(market):
    market.reset()
    steps, terminated = 0, False
    while not terminated:
        _, _, terminated, _, _ = market.step(np.zeros(30, np.float32))
        steps += 1
    assert steps == 230
    with pytest.raises(RuntimeError, match="reset"):
        market.step(np.zeros(30, np.float32))


def test_mujoco_tasks_keep_the_x_position_as_neorl():
    assert make_env("Hopper-v3").observation_space.shape == (12,)
    assert make_env("Walker2d-v5").observation_space.shape == (18,)
    assert make_env("finance").observation_space.shape == (181,)


def test_normalized_scores_use_neorl_references():
    assert normalized_score("Hopper-v3", 3294.0) == pytest.approx(100.0)
    assert normalized_score("HalfCheetah-v3", -298.0) == pytest.approx(0.0)
    assert normalized_score("finance", 100.0) is None
    assert envs.default_market_file().is_file()


def test_lockstep_episodes_return_what_one_episode_at_a_time_returns():
    weights = np.random.default_rng(0).normal(size=(12, 3)) * 0.5

    def act(observations):  # deterministic, and Hopper falls at different steps per seed
        return np.tanh(observations @ weights)

    expected = []
    for episode in range(3):
        env = make_env("Hopper-v5")
        obs, _ = env.reset(seed=7 + episode)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs[None])[0])
            total += reward
            done = terminated or truncated
        expected.append(total)
    assert len(set(expected)) == 3
    lockstep = envs.episode_returns(act, [make_env("Hopper-v5") for _ in range(3)], seed=7)
    assert lockstep == pytest.approx(expected, rel=1e-12)
