#!/usr/bin/env bash
# The paper's protocol on every image of the real datasets in ../shared/datasets (issues 12 and 14): prepare (with
# near-duplicate removal), segment + features once (LiteMedSAM offline), then every method on none and dual, 5 training
# fractions and 1-16 shots, 5 seeds. Outputs: cache-real/full/<dataset>/ (git-ignored); the metrics files are copied
# to benchmarks/results/full_<dataset>.json.
#   bash benchmarks/full_protocol.sh [dataset ...]     datasets: covid breast_cancer brain_tumor (default: all three)
# brain_tumor has no test split: prepare makes a seeded stratified 80/20 one (prepare.test_fraction, prepare.seed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
SHARED=${SHARED:-../shared/datasets}

root_of() {
  case "$1" in
    covid) echo "$SHARED/covid" ;;
    breast_cancer) echo "$SHARED/breast_ultrasound" ;;
    brain_tumor) echo "$SHARED/brain_tumor/train" ;;
    *) echo "unknown dataset $1 (covid, breast_cancer, brain_tumor)" >&2; exit 2 ;;
  esac
}

datasets=("$@")
[ ${#datasets[@]} -gt 0 ] || datasets=(covid breast_cancer brain_tumor)
for dataset in "${datasets[@]}"; do
  options=(-d "$dataset" --root "$(root_of "$dataset")" --params benchmarks/params/full_protocol.yaml --cache-dir cache-real/full)
  for stage in prepare segment features evaluate; do
    echo "== $dataset: $stage ($(date -u +%H:%M:%S))"
    medfocus "$stage" "${options[@]}" -q
  done
  cp "cache-real/full/$dataset/metrics.json" "benchmarks/results/full_$dataset.json"
done
