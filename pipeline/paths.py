"""Where every output of a dataset lives: one place, so no stage invents its own path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_ROOT = Path("cache")


@dataclass(frozen=True)
class DatasetPaths:
    dataset: str
    cache_root: Path = DEFAULT_CACHE_ROOT

    @property
    def dir(self) -> Path:
        return self.cache_root / self.dataset

    # prepare
    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.csv"

    @property
    def splits(self) -> Path:
        return self.dir / "splits.json"

    @property
    def prepare_summary(self) -> Path:
        return self.dir / "prepare.json"

    # resolve: the content specs of the per-image stages (DVC's dependencies of segment and features)
    @property
    def segment_spec(self) -> Path:
        return self.dir / "segment.spec.json"

    @property
    def features_spec(self) -> Path:
        return self.dir / "features.spec.json"

    # external test sets (pipeline.external): their summary, and per set its manifest and decoded-file cache
    @property
    def external_summary(self) -> Path:
        return self.dir / "external.json"

    @property
    def external_groups(self) -> Path:
        """Each external set's groups file (evaluate.external.<name>.groups) and its digest: evaluate's dependency."""
        return self.dir / "external_groups.json"

    def external_dir(self, name: str) -> Path:
        return self.dir / "external" / name

    # segment
    @property
    def masks_dir(self) -> Path:
        return self.dir / "masks"

    @property
    def segment_summary(self) -> Path:
        return self.dir / "segment.json"

    @property
    def gallery(self) -> Path:
        return self.dir / "masks_gallery.png"

    # features
    @property
    def features_dir(self) -> Path:
        return self.dir / "features"

    @property
    def features_summary(self) -> Path:
        return self.dir / "features.json"

    # train / evaluate / predict / report
    @property
    def models_dir(self) -> Path:
        return self.dir / "models"

    @property
    def evaluation_dir(self) -> Path:
        return self.dir / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def external_evaluation_dir(self) -> Path:
        """Plots of the external test sets (always made by evaluate, so DVC can track it as one output)."""
        return self.evaluation_dir / "external"

    @property
    def runs_csv(self) -> Path:
        return self.evaluation_dir / "runs.csv"

    @property
    def predictions_dir(self) -> Path:
        return self.dir / "predictions"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def store_url(self, kind: str, key: str, store_root: str = "") -> str:
        """A Zarr store for ``kind`` ('masks' or 'features') keyed by ``key``; ``store_root`` puts it on shared storage."""
        name = f"{key}.zarr"
        if store_root:
            return f"{store_root.rstrip('/')}/{self.dataset}/{kind}/{name}"
        return str(self.dir / kind / name)


def read_json(path: Path) -> dict:
    with Path(path).open() as handle:
        return json.load(handle)
