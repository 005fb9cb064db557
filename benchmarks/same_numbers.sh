#!/bin/bash
# Do a few small trainings give the same weights and numbers at another commit as in this tree?
# For a change that must not move existing results (e.g. the posterior-as-distribution change).
#   bash benchmarks/same_numbers.sh <commit> [data root]       e.g. bash benchmarks/same_numbers.sh HEAD~1 ../shared/data
# Prints one line per run and configuration: the SHA-256 of the final weights and the report's numbers.
set -euo pipefail
ref=${1:?give the commit to compare with}; root=$(realpath "${2:-../shared/data}")
here=$(cd "$(dirname "$0")/.." && pwd); work=$(mktemp -d)
git -C "$here" worktree add -q --detach "$work/then" "$ref" >/dev/null
trap 'git -C "$here" worktree remove --force "$work/then"; rm -rf "$work"' EXIT
common="threads=1 data.root=$root data.limit=2000 evaluate.iw_samples=20 evaluate.sample_metrics=false figures=false"
runs=("train.alpha=1.0 train.epochs=2" "experiment=best_nll train.epochs=2 train.kl_warmup_epochs=1"
      "model=mlp_vae prior=mog loss.free_bits=0.1 train.epochs=2" "model=mlp_vae loss=beta_tcvae train.epochs=1")
for tree in then now; do
  dir=$([ "$tree" = now ] && echo "$here" || echo "$work/then")
  for i in "${!runs[@]}"; do
    (cd "$dir" && OMP_NUM_THREADS=1 python run.py ${runs[$i]} $common hydra.run.dir="$work/$tree-$i" >/dev/null 2>&1)
    python - "$work/$tree-$i" "$tree" "${runs[$i]}" <<'PY'
import hashlib, json, sys
import torch
run, tree, overrides = sys.argv[1:]
state = torch.load(f"{run}/checkpoints/last.pt", weights_only=True)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state["model"].values())).hexdigest()[:16]
report = json.load(open(f"{run}/results/metrics.json"))
print(f"{tree:<5} {digest}  iw_nll {report['iw_nll']!r}  neg_elbo {report['neg_elbo']!r}  {overrides}")
PY
  done
done
