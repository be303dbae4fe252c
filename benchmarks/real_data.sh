#!/usr/bin/env bash
# The accuracy tables of benchmarks/README.md: the paper's protocol (5 fractions x 5 seeds, every method) on the real
# data in ../shared/datasets, with the two offline encoders. Outputs go to cache-real/ (git-ignored).
#   [ENCODERS="clip litemedsam"] bash benchmarks/real_data.sh [dataset ...]   datasets: covid breast_cancer brain_tumor (default: all)
# brain_tumor and breast_cancer are stratified subsets (40 and 100 images per class, see subset_csv), so the whole run fits
# in about two hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
SHARED=${SHARED:-../shared/datasets}
mkdir -p cache-real

subset_csv() {  # subset_csv ROOT PER_CLASS OUT: a path,label CSV of PER_CLASS images per class (sorted names, seeded shuffle)
  python - "$@" <<'PY'
import csv, random, sys
from pathlib import Path
root, per_class, out = Path(sys.argv[1]).resolve(), int(sys.argv[2]), Path(sys.argv[3])
rows = []
for folder in sorted(p for p in root.rglob("*") if p.is_dir() and not any(c.is_dir() for c in p.iterdir())):
    files = sorted(f for f in folder.iterdir() if f.is_file())
    random.Random(0).shuffle(files)
    rows += [(str(f), folder.name) for f in files[:per_class]]
with out.open("w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["path", "label"])
    writer.writerows(rows)
print(f"{out}: {len(rows)} images")
PY
}

root_of() {
  case "$1" in
    covid) echo "$SHARED/covid" ;;
    breast_cancer) subset_csv "$SHARED/breast_ultrasound" 100 cache-real/breast_cancer.csv >&2; echo cache-real/breast_cancer.csv ;;
    brain_tumor) subset_csv "$SHARED/brain_tumor/train" 40 cache-real/brain_tumor.csv >&2; echo cache-real/brain_tumor.csv ;;
  esac
}

datasets=("$@")
[ ${#datasets[@]} -gt 0 ] || datasets=(covid breast_cancer brain_tumor)
for dataset in "${datasets[@]}"; do
  root=$(root_of "$dataset")
  for encoder in ${ENCODERS:-clip litemedsam}; do
    # One cache folder per encoder (its own summaries), one store root for both (the masks are computed once).
    options=(-d "$dataset" --root "$root" --params "benchmarks/params/real_$encoder.yaml" --cache-dir "cache-real/$encoder")
    medfocus prepare "${options[@]}" -q
    medfocus segment "${options[@]}" -q
    medfocus features "${options[@]}" -q
    medfocus evaluate "${options[@]}" -q
  done
done
