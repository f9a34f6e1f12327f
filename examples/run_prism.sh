#!/usr/bin/env bash
# The main job: PRISM's stages (SFT -> discriminator warmup -> alignment -> RLVR) under torchrun.
#
#   bash examples/run_prism.sh                    # the embedded default on this machine (CPU is fine)
#   bash examples/run_prism.sh RECIPE [k=v ...]   # a named recipe or a recipe file, with dotted overrides
#   NPROC=8 bash examples/run_prism.sh RECIPE     # ranks on this node (multi-node: set NNODES, NODE_RANK, MASTER_ADDR)
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install.sh
recipe=${1:-embedded}
shift || true

exec .venv/bin/python -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-1}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m prism_mcore run --recipe "$recipe" "$@"
