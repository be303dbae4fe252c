"""The gated dual view's choice per seed (issue 23 item 5): what its out-of-fold check saw, and what the test set says.

For each training subset, medfocus_dual is fitted as `medfocus evaluate` fits it; its test accuracy is recorded with the
fitted gate and with the gate closed (the whole-image branch alone, γ = 0), beside the out-of-fold accuracies the gate
was fitted on. Feature stores are named directly (their keys, as `medfocus features` printed them), so a store made at
an earlier commit can be probed with today's trainer; several keys make a bank (in the features stage's order).

    python benchmarks/gate_probe.py --cache /work/wavecache/run --dataset covid --root ../shared/datasets/covid \
        --stores 838eae138cd0ad8d,3906580dee48142e --fractions 0.05 0.1 0.2 --out benchmarks/results/gate_probe_covid_bank.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import yaml

from medfocus.pipeline.cached_features import load_cached_features, subset_hashes
from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.feature_bank import open_feature_store
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_prepared
from medfocus.trainer import fit


def accuracy(model, features) -> float:
    return round(100.0 * float((model.predict_proba(features).argmax(dim=1) == features.labels).float().mean()), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="cache folder of the evaluation (its prepare and splits)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--stores", required=True, help="comma-separated feature store keys of mode dual")
    parser.add_argument("--params", default="benchmarks/params/wave_protocol.yaml")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    params = Params.model_validate(yaml.safe_load(open(args.params)))
    spec = resolve_dataset(args.dataset, args.root, params)
    paths = DatasetPaths(args.dataset, Path(args.cache))
    prepared = load_prepared(spec, params, paths, progress=False)
    features_dir = paths.dir / "features"
    store = open_feature_store([(str(features_dir / f"{key}.zarr"), key) for key in args.stores.split(",")], args.dataset, "dual")
    cached = load_cached_features(prepared, store)
    test = cached.features.subset(cached.rows([entry.hash for entry in prepared.entries if entry.split == "test"]))
    config = params.train.trainer_config()

    runs = []
    for fraction in args.fractions:
        for seed in args.seeds:
            train = cached.features.subset(cached.rows(subset_hashes(paths, fraction, None, seed)))
            model = fit("medfocus_dual", train, cached.text, config, seed)
            gated = accuracy(model, test)
            out_of_fold = model.fit_info.get("out_of_fold", {})
            model.head.gate_bias.fill_(float("-inf"))
            run = {"fraction": fraction, "seed": seed, "train_images": len(train), "test_gated": gated,
                   "test_whole_branch": accuracy(model, test),
                   "out_of_fold_accuracy": {k: round(100.0 * v, 2) for k, v in out_of_fold.get("accuracy", {}).items()},
                   "gate_mean": out_of_fold.get("gate_mean"), "gate_source": model.fit_info["hyperparameter_source"]}
            print(json.dumps(run), flush=True)
            runs.append(run)
    summary = {}
    for fraction in args.fractions:
        rows = [run for run in runs if run["fraction"] == fraction]
        oof_prefers_roi = sum(run["out_of_fold_accuracy"].get("blend", 0) > run["out_of_fold_accuracy"].get("whole", 0) for run in rows)
        test_prefers_roi = sum(run["test_gated"] > run["test_whole_branch"] for run in rows)
        summary[f"{fraction:g}"] = {
            "test_gated_mean": round(sum(run["test_gated"] for run in rows) / len(rows), 2),
            "test_whole_branch_mean": round(sum(run["test_whole_branch"] for run in rows) / len(rows), 2),
            "seeds_out_of_fold_blend_above_whole": oof_prefers_roi, "seeds_test_gated_above_whole": test_prefers_roi,
            "seeds": len(rows)}
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "stores": args.stores.split(","),
              "weights_source": cached.weights_source, "test_images": len(test), "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
