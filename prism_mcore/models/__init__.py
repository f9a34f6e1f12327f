"""Model building: the Qwen3-VL policy and the Qwen3-VL-MoE discriminator (value head) on Megatron-Core through
Megatron-Bridge, the attention backends (Transformer Engine or torch SDPA), packed inputs, HF export, and upcycling.

Importing this package prepares `import megatron.bridge` (which needs the TE import workaround when Transformer
Engine is absent) and silences the bridge's INFO-level import-time messages (tracebacks about `FP8GlobalStateManager`
that it logs when TE is missing, a note about Gemma2's attention); warnings and errors from those loggers still show.
"""

import logging

from prism_mcore.runtime.compat import install_te_import_workaround


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


install_te_import_workaround()
for _name in ("megatron.bridge.utils.import_utils", "megatron.bridge.models.gemma.gemma2_provider"):
    logging.getLogger(_name).addFilter(_WarningsOnly())

from prism_mcore.models.build import ModelHandle, build_discriminator, build_policy  # noqa: E402
from prism_mcore.models.discriminator import last_token_scores, last_token_scores_packed  # noqa: E402
from prism_mcore.models.export import iter_hf_weights, save_hf  # noqa: E402
from prism_mcore.models.inputs import PackedBatch, pack_padded, pack_sequences, unpack_to_padded  # noqa: E402
from prism_mcore.models.router import record_router_logits, router_load_balancing_loss  # noqa: E402

__all__ = [
    "ModelHandle",
    "PackedBatch",
    "build_discriminator",
    "build_policy",
    "iter_hf_weights",
    "last_token_scores",
    "last_token_scores_packed",
    "pack_padded",
    "pack_sequences",
    "record_router_logits",
    "router_load_balancing_loss",
    "save_hf",
    "unpack_to_padded",
]
