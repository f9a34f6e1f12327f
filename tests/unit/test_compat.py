"""The CPU compatibility layer: each patch makes a real Megatron call site run on a CPU-only torch build."""

import pytest
import torch

from prism_mcore.runtime import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches apply only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def patched() -> None:
    compat.apply_cpu_patches()


def test_cuda_tensors_land_on_cpu() -> None:
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(3).cuda().device.type == "cpu"
    mask = get_default_causal_mask(3)  # hard-codes device="cuda"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_rng_tracker_forks_cpu_streams() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mrandom.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched by a fork
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with mrandom.get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
    with mrandom.get_cuda_rng_tracker().fork():
        other_rank = torch.rand(4)
    assert torch.equal(first, again)  # reseeding reproduces the model-parallel stream
    assert not torch.equal(first, other_rank)  # another TP rank draws another stream (seed + 2718 + rank)
    expected = torch.Generator().manual_seed(123 + 2718)
    assert torch.equal(first, torch.rand(4, generator=expected))


def test_grad_clipping_scales_like_megatron() -> None:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(param.grad, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))
    clip_grad_by_total_norm_fp32([param], max_norm=10.0, total_norm=1.0)  # under the limit: untouched
    torch.testing.assert_close(param.grad, torch.tensor([3.0, 4.0]) / (5.0 + 1e-6))


def test_streams_events_and_device_queries() -> None:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end)
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    assert torch.cuda.current_device() == torch.device("cpu")


def test_megatron_bridge_imports_without_transformer_engine() -> None:
    from megatron.bridge import AutoBridge  # noqa: F401  fails on the unguarded TE import otherwise

    assert compat.has_transformer_engine() or "megatron.bridge: guarded transformer_engine import" in compat.APPLIED
