"""Host-memory offload of an idle model's training state: gradients and optimizer state leave the GPU between the
model's own updates and come back, bit for bit, before the next one.

In the alignment stage the policy and the discriminator train in turn on the same GPUs; each holds weights,
fp32 gradient buffers, fp32 master weights and two AdamW moments (about 18 bytes a parameter), which for the released
4B policy and 2B-MoE discriminator fill an 80 GB H100 before any activation (`tools/memory_plan.py`). Only the
weights are needed while the other model trains, scores or generates, so the rest waits in host memory.

Gradients use Megatron-Core's own facility (`DistributedDataParallel.offload_grad_buffers` /
`restore_grad_buffers`, which free the buffers' storage and keep every `main_grad` view valid; the buffers are
zeroed on return, as each step zeroes them anyway). Optimizer state moves storage by storage: each storage that
belongs to the optimizer alone (AdamW moments, fp32 master weights or their distributed-optimizer shards; never
storage shared with the model's parameters or gradient buffers) is copied into a host buffer (pinned on CUDA) and
resized to zero, then resized and copied back. Tensors keep their identity, so views the optimizer holds stay
valid. Megatron's `MegatronOptimizer.offload_to_cpu` replaces tensors instead and moves nothing on a CPU-only
machine; this path runs the same way on both, so its exactness is tested on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _optimizer_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """Every tensor a Megatron optimizer (or a chain of them) keeps: state values and the parameters it updates."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:  # a stub: this rank holds no parameters of that group
            continue
        for group in torch_optimizer.param_groups:
            yield from group["params"]
        for state in torch_optimizer.state.values():
            yield from (value for value in state.values() if isinstance(value, torch.Tensor))


class IdleStateOffload:
    """Moves the gradient buffers and optimizer state of `models` / `optimizer` to host memory and back."""

    def __init__(self, models: list[torch.nn.Module], optimizer: Any) -> None:
        self.models = models
        self.optimizer = optimizer
        self._host: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        self.offloaded = False

    def _model_storages(self) -> set[int]:
        pointers = set()
        for model in self.models:
            for param in model.parameters():
                pointers.add(param.untyped_storage().data_ptr())
                main_grad = getattr(param, "main_grad", None)
                if main_grad is not None:
                    pointers.add(main_grad.untyped_storage().data_ptr())
        return pointers

    def offload(self) -> None:
        """Free the device memory of gradients and optimizer state (their contents wait in host memory)."""
        if self.offloaded:
            return
        device = next(self.models[0].parameters()).device
        shared_with_model = self._model_storages()
        seen = set()
        for tensor in _optimizer_tensors(self.optimizer):
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if tensor.device != device or storage.nbytes() == 0 or pointer in shared_with_model or pointer in seen:
                continue
            seen.add(pointer)
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=device.type == "cuda")
            host.copy_(torch.empty(0, dtype=torch.uint8, device=device).set_(storage), non_blocking=True)
            self._host.append((storage, host))
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()  # the copies above read the storages freed below
        for storage, _ in self._host:
            storage.resize_(0)
        for model in self.models:
            model.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        self.offloaded = True

    def reload(self) -> None:
        """Bring gradients (zeroed) and optimizer state (exactly as they were) back to the device."""
        if not self.offloaded:
            return
        for model in self.models:
            model.restore_grad_buffers(synchronize=False)
        for storage, host in self._host:
            storage.resize_(host.numel())
            target = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            target.copy_(host, non_blocking=True)
        if self._host and self._host[0][0].device.type == "cuda":
            torch.cuda.synchronize()  # the host buffers are dropped right after
        self._host = []
        self.offloaded = False

    def resident_bytes(self) -> int:
        """Bytes of optimizer state and gradient buffers now on the model's device (0 while offloaded)."""
        device = next(self.models[0].parameters()).device
        shared_with_model = self._model_storages()
        total, seen = 0, set()
        for tensor in _optimizer_tensors(self.optimizer):
            storage = tensor.untyped_storage()
            if tensor.device == device and storage.data_ptr() not in shared_with_model | seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        for model in self.models:
            for buffer in model.buffers + model.expert_parallel_buffers:
                total += buffer.grad_data.untyped_storage().nbytes()
        return total
