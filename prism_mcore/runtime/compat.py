"""Compatibility layer that lets the production Megatron path run where CUDA or Transformer Engine is missing.

Two independent switches, both idempotent and both no-ops where they are not needed:

* `apply_cpu_patches()` runs only when `torch.cuda.is_available()` is False. Megatron-Core 0.19 assumes a CUDA
  device in a few dozen places (RNG tracking, buffer allocation, hard-coded `device="cuda"` tensors in the
  pipeline schedules and the optimizer, stream/event/NVTX calls, a CUDA-only type assert in gradient clipping).
  Each patch below names the failure it fixes; together they make the real model, schedules, optimizer and
  dist-checkpointing run over gloo on CPU without changing any numerics.
* `install_te_import_workaround()` runs only when `transformer_engine` cannot be imported. Megatron-Bridge imports
  TE unconditionally in one module (its LoRA layers), which breaks `import megatron.bridge` although nothing we use
  needs TE. We rewrite that single import at load time (no site-packages edits) so Megatron still sees HAVE_TE=False.

Nothing here edits installed files; every patch is applied in-process and listed in `APPLIED`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import typing

import torch
from torch.overrides import TorchFunctionMode

APPLIED: list[str] = []  # human-readable names of the patches applied in this process


def _applied(name: str) -> None:
    if name not in APPLIED:
        APPLIED.append(name)


# --------------------------------------------------------------------------------------------------------------------
# CPU patches
# --------------------------------------------------------------------------------------------------------------------


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Maps tensors that Megatron hard-codes onto CUDA to the CPU.

    Fixes: "Torch not compiled with CUDA enabled" from `torch.zeros(..., device="cuda")` in
    `pipeline_parallel/schedules.py`, `optimizer/optimizer.py`, `optimizer/clip_grads.py`, `transformer/utils.py`
    (causal masks), and from `Tensor.cuda()` / `.to("cuda")` / `pin_memory=True` in data and p2p paths.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CPU_MODE: CudaToCpuMode | None = None


def _patch_rng_tracker() -> None:
    """Megatron's `CudaRNGStatesTracker` stores `torch.cuda` generator states.

    Fixes: `model_parallel_cuda_manual_seed` and every dropout `fork()` raising "Torch not compiled with CUDA
    enabled". On CPU the CPU generator plays the device generator's role: the tracker keeps CPU states under the
    same names (data-parallel, model-parallel, expert-parallel), so TP ranks still draw different dropout masks and
    activation recomputation restores the same states, exactly as on GPU.
    """
    import megatron.core.tensor_parallel.random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    def get_state(clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker
    ):
        mrandom.initialize_rng_tracker(force_reset=True)
    _applied("rng: CPU generator states in Megatron's RNG tracker")


class _CpuEvent:
    """Timing stand-in for `torch.cuda.Event` (Megatron's timers and schedules record events)."""

    def __init__(self, *args, **kwargs) -> None:
        self._time: float | None = None

    def record(self, *args, **kwargs) -> None:
        self._time = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._time - self._time) * 1000.0

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, *args, **kwargs) -> None:
        pass


class _CpuStream:
    """Stand-in for `torch.cuda.Stream`: CPU work is already ordered, so every method is trivially satisfied."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event: _CpuEvent | None = None) -> _CpuEvent:
        event = event or _CpuEvent()
        event.record()
        return event

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _patch_torch_cuda_api() -> None:
    """Device queries, synchronisation, streams, events and NVTX ranges answered for the CPU.

    Fixes: `torch.cuda.current_device()` (about 200 call sites: buffers, rotary embeddings, routers, p2p) and
    `torch.cuda.synchronize/Event/Stream/current_stream/nvtx.range_push` raising without a CUDA build.
    `current_device()` returns `torch.device("cpu")`, which every Megatron call site passes on as a `device=`.
    """
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Event = _CpuEvent
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: 0
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: 0
    torch.cuda.nvtx.mark = lambda *args, **kwargs: None
    torch.cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()
    _applied("torch.cuda: current_device/synchronize/Event/Stream/nvtx for the CPU")


def _patch_grad_clipping() -> None:
    """`clip_grad_by_total_norm_fp32` asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.

    Fixes: AssertionError in `MegatronOptimizer.clip_grad_norm` on CPU. The replacement scales the same gradients by
    the same coefficient `max_norm / (total_norm + 1e-6)` when it is below 1, as the fused multi-tensor path does.
    """
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = float(max_norm) / (float(total_norm) + 1.0e-6)
        if coeff >= 1.0:
            return
        for param in parameters:
            grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    _applied("optimizer: CPU clip_grad_by_total_norm_fp32")


def apply_cpu_patches() -> list[str]:
    """Apply every CPU patch once; returns the list of applied patches. A no-op when CUDA is available."""
    global _CPU_MODE
    if torch.cuda.is_available():
        return APPLIED
    if _CPU_MODE is None:
        install_te_import_workaround()
        _patch_torch_cuda_api()
        _patch_rng_tracker()
        _patch_grad_clipping()
        _CPU_MODE = CudaToCpuMode()
        _CPU_MODE.__enter__()  # process-wide for the main thread, where all Megatron work runs
        _applied("TorchFunctionMode: device='cuda' / .cuda() / pin_memory -> CPU")
    return APPLIED


# --------------------------------------------------------------------------------------------------------------------
# Transformer Engine import workaround
# --------------------------------------------------------------------------------------------------------------------

_TE_IMPORTERS = frozenset({"megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora"})
_TE_IMPORT = "import transformer_engine.pytorch as te\n"
_TE_GUARDED = """try:
    import transformer_engine.pytorch as te
except ImportError:  # prism_mcore: TE is absent; these names fail only if a TE LoRA layer is built
    import types as _types

    class _TransformerEngineMissing(__import__("torch").nn.Module):
        def __init__(self, *args, **kwargs):
            raise ImportError("transformer_engine is not installed")

    te = _types.SimpleNamespace(
        Linear=_TransformerEngineMissing,
        LayerNormLinear=_TransformerEngineMissing,
        ops=_types.SimpleNamespace(Sequential=_TransformerEngineMissing),
        fp8_autocast=None,
    )
"""


class _GuardedTEImportLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str):
        source = self.get_data(self.path).decode()
        return compile(source.replace(_TE_IMPORT, _TE_GUARDED, 1), self.path, "exec", dont_inherit=True)


class _GuardedTEImportFinder(importlib.abc.MetaPathFinder):
    """Loads the few Megatron-Bridge modules that import TE unconditionally with that import guarded."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TE_IMPORTERS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                loader = _GuardedTEImportLoader(fullname, spec.origin)
                return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)
        return None


@functools.cache
def has_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def install_te_import_workaround() -> None:
    """Make `import megatron.bridge` work without Transformer Engine (no-op when TE is installed).

    Also supplies `typing.override` on Python 3.11: Megatron's training utilities import it (added in 3.12).
    """
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
        _applied("typing.override from typing_extensions (Python 3.11)")
    if has_transformer_engine():
        return
    if not any(isinstance(finder, _GuardedTEImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardedTEImportFinder())
        _applied("megatron.bridge: guarded transformer_engine import")
