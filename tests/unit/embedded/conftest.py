"""Shared fixtures of the embedded-default tests: one default build per session, and the task in memory."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from prism_mcore.data.embedded import DEFAULT_SEED, EmbeddedAssets, ensure_embedded, load_tokenizer
from prism_mcore.data.embedded.task import Example, TaskSizes, generate_task


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedAssets:
    """The embedded default exactly as `ensure_embedded()` builds it, in a temporary folder."""
    return ensure_embedded(tmp_path_factory.mktemp("embedded") / "v1")


@pytest.fixture(scope="session")
def task() -> dict[str, list[Example]]:
    """The default task's splits, as the build generates them."""
    return generate_task(TaskSizes(), DEFAULT_SEED)


@pytest.fixture(scope="session")
def tokenizer(assets: EmbeddedAssets) -> PreTrainedTokenizerBase:
    return load_tokenizer(assets.processor_path)
