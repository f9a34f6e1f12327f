#!/usr/bin/env bash
# The main job: PRISM's stages (SFT -> discriminator warmup -> alignment -> RLVR) under torchrun.
#
#   bash examples/run_prism.sh                    # the embedded default on this machine (CPU is fine), 10-15 min
#   bash examples/run_prism.sh RECIPE [k=v ...]   # examples/recipes/RECIPE.py, a registered recipe, or a recipe file
#   bash examples/run_prism.sh --compare [k=v]    # SFT -> RLVR vs SFT -> PRISM -> RLVR on the embedded default
#   bash examples/run_prism.sh --compare --seeds K [k=v]   # the same for seeds 1..K: mean and spread, with a plot
#   NPROC=8 bash examples/run_prism.sh RECIPE     # ranks on this node (multi-node: set NNODES, NODE_RANK, MASTER_ADDR)
#
# Killing a run and starting the same command again resumes it: finished stages are skipped and the running stage
# continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install.sh

# prism_mcore.launch is torchrun after a check of the config, the data paths and the run folder's lock (a problem
# is one line, exit code 2 or 3, before any worker starts); it takes a free master port unless MASTER_PORT is set
# (several nodes keep 29500), and shows a worker's config or data error as its one line. Workers die with their
# launcher (runtime.lifetime.exit_with_parent); the last launch replaces this shell (exec), so killing the script kills
# the whole run.
launch=(
  .venv/bin/python -m prism_mcore.launch
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-1}"
  --master-addr "${MASTER_ADDR:-127.0.0.1}" ${MASTER_PORT:+--master-port "$MASTER_PORT"}
)

# One comparison in FOLDER: the PRISM run, then the baseline's RLVR from the PRISM run's SFT export (same seed), so the
# two differ only by stage 2.
compare_pair() {
  local folder=$1
  shift
  "${launch[@]}" run --recipe embedded run.output_dir="$folder/prism" "$@"
  "${launch[@]}" run --recipe embedded run.output_dir="$folder/baseline" run.stages=rlvr \
    model.policy_path="$folder/prism/hf/sft" "$@"
}

if [ "${1:-}" = "--compare" ]; then
  shift
  if [ "${1:-}" = "--seeds" ]; then
    # K comparisons with run.seed = 1..K (every stage's draws differ; the embedded data stay the same), then the mean
    # and spread of each figure over the seeds.
    seeds=${2:?--seeds takes the number of seeds}
    shift 2
    for seed in $(seq 1 "$seeds"); do
      compare_pair "runs/compare_seeds/seed$seed" run.seed="$seed" "$@"
    done
    exec .venv/bin/python -m prism_mcore compare --seeds-root runs/compare_seeds
  fi
  compare_pair runs/compare "$@"
  exec .venv/bin/python -m prism_mcore compare runs/compare/baseline runs/compare/prism
fi

recipe=${1:-embedded}
shift || true
[ -f "examples/recipes/$recipe.py" ] && recipe="examples/recipes/$recipe.py"
exec "${launch[@]}" run --recipe "$recipe" "$@"
