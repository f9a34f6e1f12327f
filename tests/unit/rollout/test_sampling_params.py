"""SamplingParams: SGLang's validity rules, greedy handling, and the run config's rollout section."""

from __future__ import annotations

import pytest

from prism_mcore.config.schema import RolloutConfig
from prism_mcore.rollout import SamplingParams


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be -1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_invalid_settings_are_refused(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**changes)


def test_greedy_reports_logprobs_at_temperature_one() -> None:
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=0.0).logprob_temperature == 1.0
    assert not SamplingParams(temperature=0.7).greedy and SamplingParams(temperature=0.7).logprob_temperature == 0.7


def test_from_config_takes_the_rollout_section() -> None:
    config = RolloutConfig(n=8, temperature=0.9, top_p=0.7, top_k=50, max_new_tokens=256)
    params = SamplingParams.from_config(config, stop_token_ids=[5, 6], seed=3)
    assert params == SamplingParams(
        n=8, temperature=0.9, top_p=0.7, top_k=50, max_new_tokens=256, stop_token_ids=(5, 6), seed=3
    )
