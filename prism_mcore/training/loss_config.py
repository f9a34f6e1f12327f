"""The policy loss a stage's config asks for: its `policy_loss` section translated into the algorithms' config."""

from __future__ import annotations

from typing import Any

from prism_mcore.algorithms import PolicyLossConfig, policy_loss_preset
from prism_mcore.config.schema import PolicyLossSettings


def policy_loss_config(settings: PolicyLossSettings, tis_cap: float) -> PolicyLossConfig:
    """The algorithms' loss config: the named preset with the fields the run changed (and TIS when enabled)."""
    overrides: dict[str, Any] = {
        name: getattr(settings, name)
        for name in ("clip_low", "clip_high", "aggregation")
        if getattr(settings, name) is not None
    }
    if settings.dual_clip is not None:
        overrides["dual_clip"] = settings.dual_clip or None
    if tis_cap > 0:
        overrides["tis_cap"] = tis_cap
    return policy_loss_preset(settings.preset, **overrides)
