"""The authors' published numbers (MedFocusCLIP and pretrained CLIP after few-shot training), kept as data in
``paper_results.json`` and shown beside ours."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

PAPER_RESULTS_FILE = Path(__file__).with_name("paper_results.json")


@cache
def _paper_file() -> dict:
    return json.loads(PAPER_RESULTS_FILE.read_text())


def paper_results(dataset: str) -> dict[str, dict[float, float]] | None:
    """The authors' test accuracy (%) for ``dataset``: {method label: {training fraction: accuracy}}, or None."""
    table = _paper_file()["results"].get(dataset)
    if table is None:
        return None
    return {label: {float(fraction): value for fraction, value in by_fraction.items()} for label, by_fraction in table.items()}


def paper_datasets() -> list[str]:
    return sorted(_paper_file()["results"])
