"""A small real dataset (6 BUSI images per class) runs through every stage with default settings and exits 0.

Six images per class is where a 20 % test split leaves one test image per class and the 5 % subsets one training image
per class: every stage must cope, and train and evaluate must find the feature stores the features stage made.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from medfocus.stages.cli import app

from .conftest import requires_shared

CLASSES = ("benign", "malignant", "normal")
IMAGES_PER_CLASS = 6


def _numbered(path) -> int:
    """'benign (12).png' -> 12, so that the copy takes images 1-6 rather than 1, 10, 100, ..."""
    return int(re.search(r"\((\d+)\)", path.name).group(1))


@pytest.mark.slow
@pytest.mark.shared_data
def test_six_busi_images_per_class_exit_0_through_every_stage(tmp_path, monkeypatch):
    source = requires_shared("breast_ultrasound")
    root = tmp_path / "busi"
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for path in sorted((source / label).glob(f"{label} (*).png"), key=_numbered)[:IMAGES_PER_CLASS]:
            shutil.copy2(path, root / label / path.name)
    # No params.yaml here: the defaults are what is tested. LiteMedSAM is named so the run is offline wherever it runs.
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "breast_cancer", "--root", str(root)]
    encoder = ["--model", "litemedsam"]

    for command in (["prepare", *common, "-q"], ["segment", *common, "-q"], ["features", *common, *encoder, "-q"],
                    ["train", *common, *encoder], ["evaluate", *common, *encoder, "-q"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, f"medfocus {command[0]} exited {result.exit_code}:\n{result.output}\n{result.exception!r}"

    metrics = json.loads((tmp_path / "cache" / "breast_cancer" / "metrics.json").read_text())
    assert metrics["test_images"] == len(CLASSES) and not metrics["random_init"]
    assert {row["mode"] for row in metrics["results"]} == set(metrics["protocol"]["modes"])
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in metrics["results"])
