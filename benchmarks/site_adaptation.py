"""What would close the gap to another site (issue 28): a few of the site's own labelled images added to training.

A model trained on `brain_tumor` misses Br35H's tumours on T2-weighted and FLAIR slices (its tumour classes are all
T1-weighted with contrast; benchmarks/notes/2026-12-07-br35h-by-mr-weighting.md). Here a head is fitted for tumour vs
none (brain_tumor's three tumour classes joined) on a brain_tumor training subset plus k labelled slices of the
external set, half tumour and half not, drawn from one part of the set; it is scored on the other part, overall and per
group of a groups CSV (`path,group`, as evaluate.external.NAME.groups). The set is split by the number in each file's
name (the lower half of each class adapts, the upper half tests), so neighbouring slices (likely one patient's: the set
has no patient ids) stay on one side. Brain MRI only: the classes are no_tumor and the training dataset's others joined. Feature stores are named by key (as `medfocus features` printed them), like benchmarks/gate_probe.py.

    python benchmarks/site_adaptation.py --cache /work/wavecache/run --dataset brain_tumor \
        --root ../shared/datasets/brain_tumor/train --params benchmarks/params/wave_protocol_stretch.yaml \
        --external br35h --stores none=5afb2918aafd25e6 --stores dual=7aad7f096e5ff232 \
        --out benchmarks/results/site_adaptation_br35h.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from medfocus.pipeline.cached_features import load_cached_features, load_image_features, subset_hashes
from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.external import load_externals, read_groups
from medfocus.pipeline.feature_bank import open_feature_store
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared
from medfocus.trainer import ClassText, FeatureSet, fit

BINARY = ["no_tumor", "tumor"]
METHODS = {"none": ["linear_probe", "medfocus"], "dual": ["medfocus"]}


def joined(parts: list[FeatureSet]) -> FeatureSet:
    """One feature set of several (same store, same shapes), in order."""
    roi = [part.roi_global for part in parts]
    return FeatureSet(global_emb=torch.cat([part.global_emb for part in parts]),
                      patch_tokens=torch.cat([part.patch_tokens for part in parts]),
                      roi_weights=torch.cat([part.roi_weights for part in parts]),
                      labels=torch.cat([part.labels for part in parts]),
                      hashes=[h for part in parts for h in part.hashes],
                      roi_global=None if any(r is None for r in roi) else torch.cat(roi))


def file_number(path: str) -> int:
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else -1


def percent(mask: np.ndarray) -> float | None:
    return round(100.0 * float(mask.mean()), 2) if mask.size else None


def mean(values: list[float | None]) -> float | None:
    """Mean over seeds of the values that exist (a group without images of a class has no recall for it)."""
    present = [value for value in values if value is not None]
    return round(float(np.mean(present)), 2) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--params", required=True, help="the params file of the run that made the stores (with the external set and its groups)")
    parser.add_argument("--external", required=True)
    parser.add_argument("--stores", action="append", required=True, help="MODE=KEY[,KEY...] (several keys: a bank)")
    parser.add_argument("--fraction", type=float, default=0.2, help="brain_tumor training subset (the protocol's subsets)")
    parser.add_argument("--added", type=int, nargs="+", default=[0, 8, 16, 32, 64], help="external slices added (half per class)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    if any(added % 2 for added in args.added):
        parser.error("--added: even numbers (half tumour, half not)")
    params = Params.model_validate(yaml.safe_load(Path(args.params).read_text()))
    spec = resolve_dataset(args.dataset, args.root, params)
    paths = DatasetPaths(args.dataset, Path(args.cache))
    prepared = load_prepared(spec, params, paths, progress=False)
    external = next(item for item in load_externals(spec, params, paths, prepared) if item.name == args.external)
    groups_file = params.evaluate.external[args.external].groups
    groups = np.array(read_groups(external, groups_file).of_image, dtype=object)
    outside_labels = np.array([BINARY.index(entry.label) for entry in external.entries])
    # Lower half of each class (by file number) adapts, upper half tests.
    adapt = np.zeros(len(external.entries), dtype=bool)
    for label in range(len(BINARY)):
        members = sorted(np.flatnonzero(outside_labels == label), key=lambda i: file_number(external.entries[i].path))
        adapt[members[: len(members) // 2]] = True
    test_rows = np.flatnonzero(~adapt)
    tumour_classes = [name for name in prepared.class_names if name != "no_tumor"]
    text = ClassText(BINARY, None)
    config = params.train.trainer_config()

    runs = []
    for item in args.stores:
        mode, keys = item.split("=", 1)
        features_dir = paths.dir / "features"
        store = open_feature_store([(str(features_dir / f"{key}.zarr"), key) for key in keys.split(",")], args.dataset, mode)
        cached = load_cached_features(prepared, store)
        binary_labels = torch.tensor([int(prepared.class_names[y] in tumour_classes) for y in cached.features.labels])
        inside = FeatureSet(cached.features.global_emb, cached.features.patch_tokens, cached.features.roi_weights,
                            binary_labels, cached.features.hashes, cached.features.roi_global)
        internal_test = inside.subset(cached.rows([e.hash for e in prepared.entries if e.split == "test"]))
        outside = load_image_features(store, [entry.hash for entry in external.entries], outside_labels.tolist())
        tested = outside.subset(test_rows)
        for method in METHODS[mode]:
            for added in args.added:
                for seed in args.seeds:
                    rng = np.random.default_rng(seed)
                    chosen = [rng.choice(np.flatnonzero(adapt & (outside_labels == label)), added // 2, replace=False)
                              for label in range(len(BINARY))]
                    train = joined([inside.subset(cached.rows(subset_hashes(paths, args.fraction, None, seed))),
                                    outside.subset(np.concatenate(chosen).astype(int))])
                    model = fit(method, train, text, config, seed)
                    correct = (model.predict_proba(tested).argmax(dim=1) == tested.labels).numpy()
                    internal = (model.predict_proba(internal_test).argmax(dim=1) == internal_test.labels).numpy()
                    by_group = {}
                    for group in sorted(set(groups[test_rows])):
                        in_group = groups[test_rows] == group
                        by_group[group] = {"accuracy": percent(correct[in_group]),
                                           **{f"recall_{name}": percent(correct[in_group & (outside_labels[test_rows] == index)])
                                              for index, name in enumerate(BINARY)}}
                    run = {"method": method, "mode": mode, "added": added, "seed": seed, "train_images": len(train),
                           "internal_tumour_vs_none": percent(internal), "external": percent(correct), "by_group": by_group}
                    print(json.dumps(run), flush=True)
                    runs.append(run)

    summary = []
    for key in dict.fromkeys((run["method"], run["mode"], run["added"]) for run in runs):
        rows = [run for run in runs if (run["method"], run["mode"], run["added"]) == key]
        summary.append({"method": key[0], "mode": key[1], "added": key[2], "seeds": len(rows),
                        "internal_tumour_vs_none": mean([r["internal_tumour_vs_none"] for r in rows]),
                        "external": mean([r["external"] for r in rows]),
                        "by_group": {group: {metric: mean([r["by_group"][group][metric] for r in rows])
                                             for metric in rows[0]["by_group"][group]} for group in rows[0]["by_group"]}})
    counts = {group: {name: int(((groups[test_rows] == group) & (outside_labels[test_rows] == index)).sum())
                      for index, name in enumerate(BINARY)} for group in sorted(set(groups[test_rows]))}
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "stores": args.stores,
              "fraction": args.fraction, "external": args.external, "groups_file": groups_file,
              "adaptation_pool": int(adapt.sum()), "test_images": int(len(test_rows)), "test_images_per_group": counts,
              "seconds": round(time.perf_counter() - started), "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in summary:
        print(row["method"], row["mode"], row["added"], row["internal_tumour_vs_none"], row["external"],
              {group: (values["accuracy"], values["recall_tumor"]) for group, values in row["by_group"].items()})


if __name__ == "__main__":
    main()
