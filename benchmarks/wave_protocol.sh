#!/usr/bin/env bash
# This wave's full-size runs (issues 23, 24, 28), from one commit, on the stores the segment stage made:
#   bash benchmarks/wave_protocol.sh CACHE STEP...
# CACHE: a cache folder outside the repository. Steps, in the order they were run:
#   segment-<dataset>           prepare and segment (brain_tumor and covid were run the same way at 7c78bda, before this step)
#   features-<dataset>          stores of LiteMedSAM and EfficientNet-Lite2 (modes none, dual)
#   zoomfeatures-<dataset>      Lite2's dual-view store with the zoom (features.dual_roi_view: crop)
#   small-<dataset>-<encoder>   every method, modes none and dual, 5 / 10 / 20 %, 5 seeds (+ Br35H for brain_tumor)
#   large-<dataset>-<encoder>   50 / 100 %, seeds 0 and 1, the fusion heads and the linear probe
#   zoom-<dataset>              the dual view with Lite2's ROI crop encoded (features.dual_roi_view: crop), 5-20 %, 5 seeds
#   pooled-<dataset>            its counterpart: Lite2's dual view with the ROI-pooled view (the default)
#   all-<dataset>-<encoder>     every fraction, 5 seeds (COVID: 317 images, cheap)
#   shots-<dataset>-<encoder>   every method, 1 / 2 / 4 / 8 / 16 images per class, 5 seeds (wave_protocol_shots.yaml)
#   large5-<dataset>-<encoder>  50 / 100 %, 5 seeds, the fusion head (modes none, dual) and the linear probe
#   dual5-<dataset>-<encoder>   50 / 100 %, 5 seeds, the gated dual view (medfocus_dual, mode dual)
#   select-<dataset>-<encoder>  5 / 10 / 20 %, 5 seeds, medfocus_select (the ROI setting chosen on validation images)
#   intensity-<dataset>-<none|stretch>  EfficientNet-Lite2 alone with features.intensity none or stretch: its stores, then
#                               the linear probe, the fusion head (modes none, dual) and the gated dual view at 5 / 10 / 20 %,
#                               the first two at 100 % (wave_intensity-… and wave_intensity100-…), 5 seeds
# encoder: litemedsam | lite2 | bank (litemedsam+efficientnet_lite2). Each evaluate's metrics.json is copied to
# benchmarks/results/wave_<step><RESULT_TAG>.json with the commit that made it. RESULT_TAG (default empty) keeps a rerun
# at a later commit apart from the earlier results, e.g. RESULT_TAG=-map once brain_tumor's `auto` policy became
# brain-mri-map (bf97306).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
SHARED=${SHARED:-../shared/datasets}
CACHE=$1; shift
P=benchmarks/params/wave_protocol.yaml
ZOOM=benchmarks/params/wave_protocol_zoom.yaml
SHOTS=benchmarks/params/wave_protocol_shots.yaml
STRETCH=benchmarks/params/wave_protocol_stretch.yaml
COMMIT=$(git rev-parse --short HEAD)
RESULT_TAG=${RESULT_TAG:-}

root_of() {
  case "$1" in
    covid) echo "$SHARED/covid" ;;
    brain_tumor) echo "$SHARED/brain_tumor/train" ;;
    breast_cancer) echo "$SHARED/breast_ultrasound" ;;
    *) echo "unknown dataset $1" >&2; exit 2 ;;
  esac
}
model_of() {
  case "$1" in
    litemedsam) echo litemedsam ;;
    lite2) echo efficientnet_lite2 ;;
    bank) echo litemedsam+efficientnet_lite2 ;;
    *) echo "unknown encoder $1" >&2; exit 2 ;;
  esac
}
evaluate() {  # step dataset params evaluate-options...
  local step=$1 dataset=$2 params=$3; shift 3
  echo "== $step ($(date -u +%H:%M:%S))"
  local start=$SECONDS
  medfocus evaluate -d "$dataset" --root "$(root_of "$dataset")" --params "$params" --cache-dir "$CACHE" -q "$@" > /dev/null
  python - "$CACHE/$dataset/metrics.json" "benchmarks/results/wave_$step$RESULT_TAG.json" "$COMMIT" "$params" "$*" $((SECONDS - start)) <<'EOF'
import json, sys
source, target, commit, params, options, seconds = sys.argv[1:]
metrics = json.load(open(source))
metrics["made_by"] = {"commit": commit, "params": params, "options": options, "seconds": int(seconds)}
json.dump(metrics, open(target, "w"), indent=1)
EOF
}

for step in "$@"; do
  IFS=- read -r kind dataset encoder <<< "$step"
  case "$kind" in
    segment)
      echo "== $step ($(date -u +%H:%M:%S))"
      medfocus prepare -d "$dataset" --root "$(root_of "$dataset")" --params $P --cache-dir "$CACHE" -q | tail -3
      medfocus segment -d "$dataset" --root "$(root_of "$dataset")" --params $P --cache-dir "$CACHE" -q | tail -3 ;;
    features)
      echo "== $step ($(date -u +%H:%M:%S))"
      medfocus features -d "$dataset" --root "$(root_of "$dataset")" --params $P --cache-dir "$CACHE" -q --model litemedsam+efficientnet_lite2 ;;
    zoomfeatures)
      echo "== $step ($(date -u +%H:%M:%S))"
      medfocus features -d "$dataset" --root "$(root_of "$dataset")" --params $ZOOM --cache-dir "$CACHE" -q --model efficientnet_lite2 --mode dual ;;
    small)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" --fraction 0.05 --fraction 0.1 --fraction 0.2 ;;
    large)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" --fraction 0.5 --fraction 1.0 --seed 0 --seed 1 \
        --method linear_probe --method medfocus --method medfocus_dual ;;
    zoom)
      evaluate "$step" "$dataset" $ZOOM --model efficientnet_lite2 --mode dual --method medfocus_dual \
        --fraction 0.05 --fraction 0.1 --fraction 0.2 ;;
    pooled)
      evaluate "$step" "$dataset" $P --model efficientnet_lite2 --mode dual --method medfocus_dual \
        --fraction 0.05 --fraction 0.1 --fraction 0.2 ;;
    shots)
      evaluate "$step" "$dataset" $SHOTS --model "$(model_of "$encoder")" ;;
    large5)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" --fraction 0.5 --fraction 1.0 \
        --method linear_probe --method medfocus ;;
    dual5)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" --fraction 0.5 --fraction 1.0 \
        --method medfocus_dual --mode dual ;;
    select)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" --fraction 0.05 --fraction 0.1 --fraction 0.2 \
        --method medfocus_select ;;
    intensity)
      params=$P; [ "$encoder" = stretch ] && params=$STRETCH
      echo "== $step features ($(date -u +%H:%M:%S))"
      medfocus features -d "$dataset" --root "$(root_of "$dataset")" --params $params --cache-dir "$CACHE" -q --model efficientnet_lite2
      evaluate "$step" "$dataset" $params --model efficientnet_lite2 --fraction 0.05 --fraction 0.1 --fraction 0.2 \
        --method linear_probe --method medfocus --method medfocus_dual
      evaluate "intensity100-$dataset-$encoder" "$dataset" $params --model efficientnet_lite2 --fraction 1.0 \
        --method linear_probe --method medfocus ;;
    all)
      evaluate "$step" "$dataset" $P --model "$(model_of "$encoder")" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
