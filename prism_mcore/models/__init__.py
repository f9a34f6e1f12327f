"""Model building: the Qwen3-VL policy and the Qwen3-VL-MoE discriminator (value head) on Megatron-Core through
Megatron-Bridge, the attention backends (Transformer Engine or torch SDPA), packed forward inputs, HF export, and
upcycling.

Importing this package prepares `import megatron.bridge` (which needs the TE import workaround when Transformer
Engine is absent) and silences the bridge's INFO-level import-time messages (tracebacks about `FP8GlobalStateManager`
that it logs when TE is missing, a note about Gemma2's attention); warnings and errors from those loggers still show.
The names below are imported on first use (PEP 562), so a module that needs no Megatron (`models.upcycle`, which
works on HF checkpoints) does not pay seconds for importing Megatron-Bridge.
"""

import importlib
import logging
from typing import Any

from prism_mcore.runtime.compat import install_te_import_workaround


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


install_te_import_workaround()
for _name in ("megatron.bridge.utils.import_utils", "megatron.bridge.models.gemma.gemma2_provider"):
    logging.getLogger(_name).addFilter(_WarningsOnly())

# Public name -> the submodule defining it.
_EXPORTS = {
    "ModelHandle": "build",
    "build_discriminator": "build",
    "build_policy": "build",
    "forward_kwargs": "inputs",
    "iter_hf_weights": "export",
    "packed_seq_params": "inputs",
    "padding_token_id": "inputs",
    "record_eval_scores": "discriminator",
    "record_router_logits": "router",
    "router_load_balancing_loss": "router",
    "save_hf": "export",
    "step_images": "qwen3_vl",
    "token_multiple": "inputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
