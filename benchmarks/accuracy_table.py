"""Markdown accuracy table (mean ± std over seeds, %) of one or more ``metrics.json`` files, as in benchmarks/README.md.

One row per (encoder weights, method, ROI mode), one column per training fraction, and the authors' numbers (pipeline/paper_results.json) for
the dataset beside them. Every row names its encoder and weights source, so a random-init row can never pass as real.

    python benchmarks/accuracy_table.py cache-real/clip/covid/metrics.json cache-real/litemedsam/covid/metrics.json
    python benchmarks/accuracy_table.py --external br35h benchmarks/results/wave_small-brain_tumor-bank.json   # that set's accuracy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfocus.pipeline.paper import paper_results


def encoder_label(metrics: dict) -> str:
    return "/".join(sorted({entry["encoder_model"] for entry in metrics["features"].values()}))


def table(paths: list[Path], external: str | None = None) -> str:
    """The table of internal test accuracy, or with ``external`` that external test set's accuracy of the same fits."""
    loaded = [json.loads(path.read_text()) for path in paths]
    fractions = sorted({r["fraction"] for m in loaded for r in m["results"] if r["fraction"] is not None})
    header = "| encoder (weights) | method | ROI mode | " + " | ".join(f"{f * 100:g} %" for f in fractions) + " |"
    lines = [header, "|" + "---|" * (3 + len(fractions))]
    for metrics in loaded:
        cells: dict[tuple[str, str], dict[float, str]] = {}
        for row in metrics["results"]:
            if row["fraction"] is None:
                continue
            scores = row.get("external", {}).get(external) if external else row
            if scores is None:
                continue
            cells.setdefault((row["method"], row["mode"]), {})[row["fraction"]] = (
                f"{scores['accuracy']:.1f} ± {scores['accuracy_std']:.1f}"
            )
        label = f"{encoder_label(metrics)} ({metrics['weights_source']})"
        for (method, mode), by_fraction in sorted(cells.items()):
            values = " | ".join(by_fraction.get(f, "-") for f in fractions)
            lines.append(f"| {label} | {method} | {mode} | {values} |")
    dataset = loaded[0]["dataset"]
    if external:
        images = ", ".join(sorted({str(m["external"][external].get("images")) for m in loaded if external in m.get("external", {})}))
        return f"{dataset} → external test set {external}: {images} images\n\n" + "\n".join(lines)
    for name, by_fraction in (paper_results(dataset) or {}).items():
        values = " | ".join(f"{by_fraction[f]:.2f}" if f in by_fraction else "-" for f in fractions)
        lines.append(f"| paper, pretrained CLIP | {name} | - | {values} |")
    tests = ", ".join(sorted({str(m["test_images"]) for m in loaded}))
    return f"{dataset}: {tests} test images\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, nargs="+")
    parser.add_argument("--external", help="an external test set's name (evaluate.external): its accuracy instead of the internal one")
    args = parser.parse_args(argv)
    print(table(args.metrics, args.external))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
