# prism_mcore on GPU nodes. The NGC PyTorch image (Python 3.12, CUDA 13) already ships torch, Transformer Engine
# and flash-attn; tools/install.sh reuses them (its venv sees the system site-packages) and adds Megatron-Core,
# Megatron-Bridge, DALI and the project.
#   docker build -t prism_mcore .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/runs:/workspace/prism_mcore/runs prism_mcore \
#       bash examples/run_prism.sh qwen3vl_4b_grpo
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/prism_mcore
COPY . .
RUN PRISM_EXTRAS=dali-cu13,tensorboard,dev bash tools/install.sh

# SGLang pins its own torch build, so it lives in its own environment and is used only to launch rollout servers:
#   /opt/sglang/bin/python -m sglang.launch_server --model-path ... --port 30000
RUN python -m venv /opt/sglang && /opt/sglang/bin/pip install --no-cache-dir "sglang[all]==0.5.23"

ENV PATH=/workspace/prism_mcore/.venv/bin:$PATH
