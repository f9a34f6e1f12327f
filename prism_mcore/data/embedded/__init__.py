"""The embedded default: a tokenizer, a processor, tiny Qwen3-VL policy and MoE discriminator checkpoints and a
synthetic visual-reasoning task, built locally and deterministically so that all three PRISM stages run end to end
on a CPU-only machine in minutes, with no downloads.

`ensure_embedded()` returns the paths, building them into the project cache on first use (see `build`); the files
are in the same formats as the real PRISM datasets and checkpoints, so every stage reads them with its ordinary
readers.
"""

from prism_mcore.data.embedded.build import (
    DEFAULT_SEED,
    FORMAT_VERSION,
    EmbeddedAssets,
    default_root,
    ensure_embedded,
)
from prism_mcore.data.embedded.processor import load_processor
from prism_mcore.data.embedded.task import TaskSizes
from prism_mcore.data.embedded.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_SEED",
    "FORMAT_VERSION",
    "EmbeddedAssets",
    "TaskSizes",
    "default_root",
    "ensure_embedded",
    "load_processor",
    "load_tokenizer",
]
