"""One source per enumeration: the config accepts exactly the policy-loss presets, aggregation modes and
alignment-advantage modes the algorithms define, and the data modules use the schema's own allowed values. Retired
keys stop with one line naming what replaced them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from prism_mcore.algorithms import POLICY_LOSS_PRESETS, AdvantageMode, AlignmentAdvantageConfig, policy_loss_preset
from prism_mcore.algorithms.policy_loss import LossAggregation
from prism_mcore.config import Config, ConfigError, apply_overrides, load_recipe
from prism_mcore.config.schema import AlignConfig, DataConfig, PolicyLossSettings
from prism_mcore.data import errors, images, samples


def _allowed(section: type, name: str) -> tuple[str, ...]:
    """The values the overrides accept for `section.name` (None left out)."""
    hint = get_type_hints(section)[name]
    values = get_args(hint)
    if type(None) in values:  # `X | None`: the Literal inside
        (hint,) = [arg for arg in values if arg is not type(None)]
        values = get_args(hint)
    return values


def test_the_config_accepts_exactly_the_algorithms_registries() -> None:
    assert (
        _allowed(PolicyLossSettings, "preset") == ("prism_align", "grpo", "dapo", "gspo") == tuple(POLICY_LOSS_PRESETS)
    )
    assert _allowed(PolicyLossSettings, "aggregation") == tuple(mode.value for mode in LossAggregation)
    assert _allowed(PolicyLossSettings, "aggregation")[0] == "token-mean" and len(LossAggregation) == 4
    assert _allowed(AlignConfig, "advantage_mode") == tuple(mode.value for mode in AdvantageMode)
    assert len(AdvantageMode) == 6
    # Every value the config accepts builds in the algorithms, the preset with each aggregation.
    for preset in _allowed(PolicyLossSettings, "preset"):
        for aggregation in _allowed(PolicyLossSettings, "aggregation"):
            assert policy_loss_preset(preset, aggregation=aggregation).aggregation == aggregation
    for mode in _allowed(AlignConfig, "advantage_mode"):
        assert AlignmentAdvantageConfig(mode=mode).mode is AdvantageMode(mode)


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("rlvr.policy_loss.preset=ppo", "'prism_align', 'grpo', 'dapo', 'gspo'"),
        ("align.policy_loss.aggregation=mean", "'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'"),
        ("align.advantage_mode=mode2", "'multi_reward', 'sign_align', 'rlvr_v2', 'rlvr', 'gated_align', 'acc_gating'"),
    ],
)
def test_a_value_outside_the_registry_is_refused_with_the_registrys_names(override: str, allowed: str) -> None:
    with pytest.raises(
        ConfigError, match=f"{override.split('=')[0]}: .* (is not allowed; choose|is not) one of"
    ) as err:
        apply_overrides(Config(), [override])
    assert allowed in str(err.value)


def test_the_data_modules_use_the_schemas_allowed_values() -> None:
    hints = get_type_hints(DataConfig)
    assert get_type_hints(errors.checked)["on_error"] is hints["on_error"]
    assert get_type_hints(images.ImageConfig)["backend"] is hints["image_backend"]
    assert get_type_hints(samples.LengthLimits)["over_length"] is hints["over_length"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.max_response_length", "512", "data.max_response_length was renamed data.max_segment_length"),
        ("data.packing", "true", "data.packing was removed: micro-batches are always packed"),
        ("sft.micro_batch_size", "8", "sft.micro_batch_size was removed: micro-batches are sized in tokens"),
        ("warmup.micro_batch_size", "8", "warmup.micro_batch_size was removed: micro-batches are sized in tokens"),
    ],
)
def test_a_retired_key_is_one_line_naming_what_replaced_it(key: str, value: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        apply_overrides(Config(), [f"{key}={value}"])
    assert "\n" not in str(err.value)
    section, name = key.split(".")
    recipe = tmp_path / "old_config.json"  # a run folder's config.json written before the change
    recipe.write_text(json.dumps({section: {name: int(value) if value.isdigit() else True}}))
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(recipe))
    assert apply_overrides(Config(), ["data.max_segment_length=512"]).data.max_segment_length == 512
