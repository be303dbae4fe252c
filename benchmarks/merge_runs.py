"""One accuracy table (mean ± sample std over seeds, %) from the ``runs.csv`` of several evaluations of one dataset.

A full-size protocol that does not fit one session runs in parts on the same stores and splits (benchmarks/README.md
names each part). Each run is keyed by (method, mode, fraction, shots, seed); a later file replaces an earlier file's
run with the same key, so list the files oldest first. Prints the fraction and k-shot tables (only seeds present for
every listed row are averaged, and each row says how many) and writes the merged runs as JSON.

    python benchmarks/merge_runs.py --dataset brain_tumor --out benchmarks/results/full_brain_tumor_5seeds.json \
        --row medfocus/none --row medfocus_dual/dual ... cache-real/full/brain_tumor/evaluation/runs.csv ...
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from medfocus.pipeline.paper import paper_results

KEY_FIELDS = ("method", "mode", "fraction", "shots", "seed")


def _number(value: str) -> float | int | None:
    if value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number


def read_runs(paths: list[Path]) -> dict[tuple, dict]:
    merged: dict[tuple, dict] = {}
    for path in paths:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                run = {"method": row["method"], "mode": row["mode"], "fraction": _number(row["fraction"]),
                       "shots": _number(row["shots"]), "seed": int(row["seed"]), "accuracy": float(row["accuracy"]),
                       "n_train": int(row["n_train"]), "hyperparameters": json.loads(row["hyperparameters"] or "{}"),
                       "source": str(path)}
                merged[tuple(run[field] for field in KEY_FIELDS)] = run
    return merged


def _cell(accuracies: list[float]) -> str:
    mean = 100 * statistics.mean(accuracies)
    std = 100 * statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table(runs: dict[tuple, dict], rows: list[tuple[str, str]], by: str, dataset: str) -> str:
    subsets = sorted({run[by] for run in runs.values() if run[by] is not None})
    label = (lambda value: f"{100 * value:g} %") if by == "fraction" else (lambda value: f"{value}-shot")
    lines = ["| method / mode | seeds | " + " | ".join(label(value) for value in subsets) + " |",
             "|---|---|" + "---|" * len(subsets)]
    if by == "fraction":
        for name, by_fraction in (paper_results(dataset) or {}).items():
            lines.append(f"| **{name} (paper)** | | " + " | ".join(f"{by_fraction[f]:.2f}" if f in by_fraction else "-" for f in subsets) + " |")
    for method, mode in rows:
        cells, seed_counts = [], set()
        for value in subsets:
            accuracies = [run["accuracy"] for run in runs.values()
                          if (run["method"], run["mode"], run[by]) == (method, mode, value)]
            seed_counts.add(len(accuracies))
            cells.append(_cell(accuracies) if accuracies else "-")
        lines.append(f"| {method} / {mode} | {'/'.join(str(count) for count in sorted(seed_counts))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="runs.csv files, oldest first")
    parser.add_argument("--dataset", required=True, help="dataset name (for the authors' numbers)")
    parser.add_argument("--row", action="append", required=True, help="method/mode, in table order (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the merged runs")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    rows = [tuple(row.split("/")) for row in args.row]
    print(table(runs, rows, "fraction", args.dataset))
    print()
    print(table(runs, rows, "shots", args.dataset))
    merged = sorted(runs.values(), key=lambda run: tuple(str(run[field]) for field in KEY_FIELDS))
    args.out.write_text(json.dumps({"dataset": args.dataset, "sources": [str(path) for path in args.runs], "runs": merged},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
