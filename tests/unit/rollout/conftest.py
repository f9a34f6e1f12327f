"""Fixtures of the rollout unit tests: the embedded default (policy checkpoint, prompts with images)."""

from __future__ import annotations

import pytest

from prism_mcore.data.embedded import EmbeddedAssets, ensure_embedded
from prism_mcore.record import Sample
from tests.rollout_support import rollout_prompts


@pytest.fixture(scope="session")
def embedded() -> EmbeddedAssets:
    return ensure_embedded()


@pytest.fixture(scope="session")
def prompts(embedded: EmbeddedAssets) -> list[Sample]:
    """Three image prompts (images of two sizes) and one text-only prompt."""
    return rollout_prompts(embedded)
