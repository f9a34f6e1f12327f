"""Idle-state offload (training/offload.py): gradients and optimizer state leave the device between a model's steps
and come back bit for bit. Two identical tiny Megatron GPTs train side by side, one offloaded between its steps
(with the other model's step in between, as in alignment); their weights, optimizer state and losses must stay
equal, and while offloaded the offloaded model holds no gradient or optimizer memory."""

from __future__ import annotations

import pytest
import torch

from prism_mcore.config.schema import OptimConfig, ParallelConfig
from tests import tiny_gpt


@pytest.fixture(scope="module")
def runtime() -> None:
    from prism_mcore.runtime import init_distributed

    init_distributed(ParallelConfig(), seed=0)


def _trainable(bf16: bool):
    from megatron.core import tensor_parallel

    from prism_mcore.training.step import build_optimizer, wrap_ddp

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    model = tiny_gpt.build_gpt()
    if bf16:  # Megatron's mixed-precision optimizer (fp32 master weights) takes CUDA tensors only
        model = model.cuda().to(torch.bfloat16)
        model.config.bf16 = True
        model.config.params_dtype = torch.bfloat16
    models = wrap_ddp([model], use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer(
        models, OptimConfig(lr=1e-2, weight_decay=0.01), total_steps=8, use_distributed_optimizer=False, bf16=bf16
    )
    return models, optimizer, scheduler


def _state(models, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in models[0].parameters()]
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            tensors += [p.detach().clone() for p in group["params"]]
        for state in inner.optimizer.state.values():
            tensors += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


@pytest.mark.parametrize(
    "bf16", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["fp32", "cuda-bf16-master-weights"]
)
def test_offloaded_training_is_bit_exact(runtime, bf16: bool) -> None:
    from prism_mcore.training.offload import IdleStateOffload
    from prism_mcore.training.step import train_step

    plain = _trainable(bf16)
    offloaded = _trainable(bf16)
    other = _trainable(bf16)  # the model that trains while the offloaded one is idle
    offload = IdleStateOffload(offloaded[0], offloaded[1])
    assert _state(plain[0], plain[1]) and all(
        torch.equal(a, b) for a, b in zip(_state(plain[0], plain[1]), _state(*offloaded[:2]), strict=True)
    )
    offload.offload()
    device = next(offloaded[0][0].parameters()).device

    def batches_of(step: int) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in b.items()} for b in tiny_gpt.microbatches(step, 0, 1)]

    for step in range(4):
        batches = batches_of(step)
        expected = train_step(*plain, tiny_gpt.forward_step, batches)
        offload.reload()
        result = train_step(*offloaded, tiny_gpt.forward_step, batches)
        offload.offload()
        assert offload.resident_bytes() == 0  # nothing but the weights stays behind
        train_step(*other, tiny_gpt.forward_step, batches_of(step + 1))
        assert result.metrics == expected.metrics and result.grad_norm == expected.grad_norm
    offload.reload()
    assert offload.resident_bytes() > 0
    after_plain, after_offloaded = _state(plain[0], plain[1]), _state(*offloaded[:2])
    assert len(after_plain) > sum(1 for _ in plain[0][0].parameters())  # AdamW moments were compared too
    for a, b in zip(after_plain, after_offloaded, strict=True):
        assert torch.equal(a, b)
    # and the weights moved: the comparison is not between two untrained models
    assert not all(torch.equal(a, b) for a, b in zip(after_plain, _state(*_trainable(bf16)[:2]), strict=True))


def test_offload_frees_optimizer_storage_but_never_the_weights(runtime) -> None:
    from prism_mcore.training.offload import IdleStateOffload
    from prism_mcore.training.step import train_step

    models, optimizer, scheduler = _trainable(bf16=False)
    train_step(models, optimizer, scheduler, tiny_gpt.forward_step, tiny_gpt.microbatches(0, 0, 1))
    weights = [p.detach().clone() for p in models[0].parameters()]
    moments = [v for s in optimizer.optimizer.state.values() for v in s.values() if v.numel() > 1]
    offload = IdleStateOffload(models, optimizer)
    offload.offload()
    assert moments and all(m.untyped_storage().nbytes() == 0 for m in moments)
    assert all(p.main_grad.untyped_storage().nbytes() == 0 for p in models[0].parameters())
    assert all(torch.equal(p, w) for p, w in zip(models[0].parameters(), weights, strict=True))
    offload.offload()  # idempotent
    offload.reload()
    offload.reload()
    assert all(m.untyped_storage().nbytes() > 0 for m in moments)
    assert all(p.main_grad.abs().sum() == 0 for p in models[0].parameters())  # gradients come back zeroed


def test_an_offloaded_trainable_checkpoints_and_resumes_its_full_state(runtime, tmp_path) -> None:
    """Checkpoints bring the state back for the save and load (`training.loop.all_resident`): a run resumed from
    an offloaded trainable's checkpoint continues exactly like the uninterrupted run."""
    from prism_mcore.training.loop import Trainable, all_resident
    from prism_mcore.training.offload import IdleStateOffload
    from prism_mcore.training.resume import CheckpointManager

    def trainable() -> Trainable:
        models, optimizer, scheduler = _trainable(bf16=False)
        made = Trainable(handle=None, models=models, optimizer=optimizer, scheduler=scheduler)
        made.idle_offload = IdleStateOffload(models, optimizer)
        made.idle_offload.offload()
        return made

    straight, first = trainable(), trainable()
    for step in range(2):
        straight.step(tiny_gpt.forward_step, tiny_gpt.microbatches(step, 0, 1))
        first.step(tiny_gpt.forward_step, tiny_gpt.microbatches(step, 0, 1))
    manager = CheckpointManager(tmp_path / "ckpt")
    with all_resident({"gpt": first}):
        manager.save(2, {"gpt": first})
    assert first.idle_offload.offloaded and first.idle_offload.resident_bytes() == 0

    resumed = trainable()
    with all_resident({"gpt": resumed}):
        manager.load(manager.latest(), {"gpt": resumed})
    assert resumed.idle_offload.offloaded and resumed.idle_offload.resident_bytes() == 0
    for step in range(2, 4):
        expected = straight.step(tiny_gpt.forward_step, tiny_gpt.microbatches(step, 0, 1))
        result = resumed.step(tiny_gpt.forward_step, tiny_gpt.microbatches(step, 0, 1))
        assert result.metrics == expected.metrics and result.grad_norm == expected.grad_norm
