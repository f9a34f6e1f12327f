"""Fixtures shared by the HTTP server tests: the embedded default's assets and rollout prompts built from them."""

from __future__ import annotations

import pytest

from prism_mcore.data.embedded import EmbeddedAssets, ensure_embedded
from prism_mcore.record import Sample
from tests.rollout_support import rollout_prompts


@pytest.fixture(scope="module")
def embedded() -> EmbeddedAssets:
    return ensure_embedded()


@pytest.fixture(scope="module")
def prompts(embedded: EmbeddedAssets) -> list[Sample]:
    return rollout_prompts(embedded)
