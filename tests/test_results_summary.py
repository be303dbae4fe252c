"""The headline, the compact table and the per-class results (medfocus.pipeline.results_summary) on small synthetic runs."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

from medfocus.pipeline.results_summary import (
    compact_table,
    headline,
    paired_difference_ci,
    per_class,
    render_text,
    sensitivity_specificity,
    summarize,
    uses_roi,
)
from medfocus.trainer.metrics import aggregate, compute_metrics

CLASSES = ["cyst", "nodule", "mass"]
LABELS = np.array([0, 1, 2] * 10)  # 30 test images
DATASET = {"name": "toy", "images": 150, "train_images": 120, "test_images": 30,
           "classes": [{"name": name, "train": 40, "test": 10} for name in CLASSES]}
MODELS = {"encoder": {"name": "litemedsam", "weights": "pretrained:litemedsam", "sha256": "ab" * 32, "random_init": False},
          "segmenter": {"name": "litemedsam", "weights": "pretrained:litemedsam", "sha256": "cd" * 32, "random_init": False,
                        "policy": "demo-lesion"}}
CHOSEN = {"method": "medfocus", "mode": "dual", "fraction": 1.0, "shots": None, "chosen_by": "train.method/train.mode"}


def _run(method: str, mode: str, fraction: float, seed: int, hit_rate: float) -> dict:
    """A run whose predictions are right on about ``hit_rate`` of the test images (seeded by the row and the seed)."""
    rng = np.random.default_rng(zlib.crc32(f"{method}/{mode}/{fraction}/{seed}".encode()))
    right = rng.random(len(LABELS)) < hit_rate
    predicted = np.where(right, LABELS, (LABELS + 1) % 3)
    proba = np.full((len(LABELS), 3), 0.1)
    proba[np.arange(len(LABELS)), predicted] = 0.8
    return {"method": method, "mode": mode, "fraction": fraction, "shots": None, "seed": seed,
            "weights_source": "pretrained:litemedsam", **compute_metrics(LABELS, proba, CLASSES),
            "correct": right.astype(int).tolist()}


def _runs(rates: dict[tuple[str, str], dict[float, float]], seeds=(0, 1, 2)) -> list[dict]:
    runs = []
    for (method, mode), by_fraction in rates.items():
        for fraction, rate in by_fraction.items():
            for seed in seeds:
                run = _run(method, mode, fraction, seed, rate)
                if method == "linear_probe":  # a global-embedding method: the same numbers in none and dual
                    run = _run(method, "none", fraction, seed, rate) | {"mode": mode}
                runs.append(run)
    return runs


def _results(runs: list[dict]) -> list[dict]:
    """metrics.json's rows, as evaluate's accuracy_table writes them."""
    percent = lambda value: None if value is None else round(100 * value, 2)  # noqa: E731
    return [{"method": g["method"], "mode": g["mode"], "fraction": g["fraction"], "shots": g["shots"],
             "accuracy": percent(g["accuracy"]["mean"]), "accuracy_std": percent(g["accuracy"]["std"]),
             "accuracy_ci95": [percent(b) for b in g["accuracy_ci95"]], "balanced_accuracy": percent(g["balanced_accuracy"]["mean"]),
             "macro_f1": percent(g["macro_f1"]["mean"]), "auroc": percent(g["auroc_ovr"]["mean"]), "seeds": g["n_runs"],
             "weights_source": g["weights_source"]} for g in aggregate(runs)["groups"]]


RATES = {
    ("linear_probe", "none"): {0.05: 0.5, 1.0: 0.6},
    ("linear_probe", "dual"): {0.05: 0.5, 1.0: 0.6},
    ("medfocus", "none"): {0.05: 0.4, 1.0: 0.5},
    ("medfocus", "dual"): {0.05: 0.55, 1.0: 0.97},
}


@pytest.fixture(scope="module")
def toy():
    runs = _runs(RATES)
    results = _results(runs)
    summary = summarize(results, runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=["covid", "brain_tumor"],
                        chosen=CHOSEN, roi_quality={"dice": 0.87, "iou": 0.78, "n": 150, "truth": "data/toy/lesion_masks"},
                        methods=["linear_probe", "medfocus"], modes=["none", "dual"])
    return runs, results, summary


def _result(results: list[dict], method: str, mode: str, fraction: float) -> dict:
    return next(r for r in results if (r["method"], r["mode"], r["fraction"]) == (method, mode, fraction))


def test_which_rows_use_the_roi():
    assert not uses_roi("medfocus", "none") and uses_roi("medfocus", "dual") and uses_roi("medfocus_dual", "dual")
    assert not uses_roi("linear_probe", "dual")  # the global embedding of mode dual is the whole image's
    assert uses_roi("linear_probe", "crop") and uses_roi("zero_shot", "attention")


def test_global_only_methods_are_shown_once_and_the_best_per_column_marked(toy):
    _, results, summary = toy
    table = summary["table"]
    assert table["columns"] == ["5%", "100%"]
    assert [row["label"] for row in table["rows"]] == ["linear_probe", "medfocus, whole image", "medfocus, ROI: dual"]
    assert table["merged"] == ["linear_probe"]
    best = {column: [row["label"] for row in table["rows"] if row["cells"][column]["best"]] for column in table["columns"]}
    for column, fraction in (("5%", 0.05), ("100%", 1.0)):
        top = max(results, key=lambda r: r["accuracy"] if r["fraction"] == fraction else -1)
        expected = "linear_probe" if top["method"] == "linear_probe" else f"medfocus, {'ROI: dual' if top['mode'] == 'dual' else 'whole image'}"
        assert best[column] == [expected]
    cell = table["rows"][2]["cells"]["100%"]
    row = _result(results, "medfocus", "dual", 1.0)
    assert (cell["mean"], cell["std"], cell["ci95"]) == (row["accuracy"], row["accuracy_std"], row["accuracy_ci95"])


def test_rows_that_differ_between_modes_are_not_merged():
    runs = _runs({("tip_adapter", "none"): {1.0: 0.5}}) + [r | {"mode": "dual"} for r in _runs({("tip_adapter", "x"): {1.0: 0.9}})]
    table = compact_table(_results(runs))
    assert [row["label"] for row in table["rows"]] == ["tip_adapter, whole image", "tip_adapter, whole image (dual)"]
    assert table["merged"] == []


def test_ties_are_all_marked_best():
    rows = [{"method": m, "mode": "none", "fraction": 1.0, "shots": None, "accuracy": 80.0, "accuracy_std": 1.0,
             "accuracy_ci95": [70.0, 90.0], "seeds": 2} for m in ("linear_probe", "tip_adapter")]
    rows.append(rows[0] | {"method": "zero_shot", "accuracy": 79.99})
    table = compact_table(rows)
    assert {row["method"]: row["cells"]["100%"]["best"] for row in table["rows"]} == {
        "zero_shot": False, "linear_probe": True, "tip_adapter": True}


def test_roi_effect_is_best_roi_row_minus_best_whole_image_row(toy):
    _, results, summary = toy
    effect = {e["column"]: e for e in summary["roi_effect"]["by_column"]}
    at_full = effect["100%"]
    roi, whole = _result(results, "medfocus", "dual", 1.0), _result(results, "linear_probe", "none", 1.0)
    assert at_full["roi"]["label"] == "medfocus, ROI: dual" and at_full["whole"]["label"] == "linear_probe"
    assert at_full["difference"] == round(roi["accuracy"] - whole["accuracy"], 2) > 20
    low, high = at_full["ci95"]
    assert 0 < low < at_full["difference"] < high and at_full["verdict"] == "helps"
    assert at_full["paired_seeds"] == [0, 1, 2]


def test_roi_effect_negative_when_the_roi_hurts():
    runs = _runs({("medfocus", "none"): {1.0: 0.95}, ("medfocus", "dual"): {1.0: 0.3}})
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=[], chosen=None)
    (effect,) = summary["roi_effect"]["by_column"]
    assert effect["difference"] < -40 and effect["ci95"][1] < 0 and effect["verdict"] == "hurts"
    assert "Focusing on the ROI hurts at every subset" in headline(summary)[1]


def test_roi_effect_unclear_when_the_rows_are_level():
    runs = _runs({("medfocus", "none"): {0.05: 0.6, 1.0: 0.6}, ("medfocus", "dual"): {0.05: 0.6, 1.0: 0.6}})
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=[], chosen=None)
    assert [e["verdict"] for e in summary["roi_effect"]["by_column"]] == ["unclear", "unclear"]
    assert headline(summary)[1].startswith("Focusing on the ROI makes no clear difference at any subset: ")


def test_roi_effect_not_measured_without_a_whole_image_row():
    runs = _runs({("medfocus", "dual"): {1.0: 0.9}})
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=[], chosen=None)
    assert summary["roi_effect"]["by_column"] == [] and "mode none" in summary["roi_effect"]["why"]
    assert headline(summary)[1].startswith("The ROI's effect is not measured")


def test_paired_interval_is_tighter_than_unpaired_and_centred_on_the_difference():
    rng = np.random.default_rng(1)
    base = (rng.random((5, 200)) < 0.6).astype(int)
    better = base.copy()
    better[:, :20] = 1  # the same images plus some: a small but sure gain
    gain = 100 * (better.mean() - base.mean())
    low, high = paired_difference_ci(better, base)
    assert 0 < low <= gain <= high
    assert paired_difference_ci(better, base) == (low, high)  # seeded
    assert paired_difference_ci(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference_ci(base, base[:, :10])


def test_sensitivity_and_specificity_from_a_known_confusion_matrix():
    # rows: true class, columns: predicted
    matrix = [[8, 2, 0],
              [1, 6, 3],
              [0, 0, 10]]
    first, second, third = sensitivity_specificity(matrix)
    assert first["sensitivity"] == pytest.approx(8 / 10) and first["specificity"] == pytest.approx(19 / 20)
    assert second["sensitivity"] == pytest.approx(6 / 10) and second["specificity"] == pytest.approx(18 / 20)
    assert third["sensitivity"] == pytest.approx(1.0) and third["specificity"] == pytest.approx(17 / 20)
    assert (second["tp"], second["fn"], second["fp"], second["tn"]) == (6, 4, 2, 18)
    assert sensitivity_specificity([[0, 0], [0, 5]])[0]["sensitivity"] is None


def test_per_class_of_the_row_chosen_in_advance(toy):
    runs, _, summary = toy
    classes = summary["per_class"]
    assert (classes["method"], classes["mode"], classes["column"], classes["seeds"]) == ("medfocus", "dual", "100%", [0, 1, 2])
    chosen = [r for r in runs if (r["method"], r["mode"], r["fraction"]) == ("medfocus", "dual", 1.0)]
    summed = np.sum([r["confusion_matrix"] for r in chosen], axis=0)
    assert classes["confusion_matrix_summed"] == summed.tolist()
    recall = [100 * r["per_class_recall"]["nodule"] for r in chosen]
    assert classes["classes"][1]["sensitivity"]["mean"] == round(float(np.mean(recall)), 2)
    assert classes["classes"][1]["test_images"] == 10
    assert per_class(runs, CHOSEN | {"method": "medfocus_dual"}) is None


def test_headline_numbers_and_the_paper(toy):
    runs, results, summary = toy
    sentences = headline(summary)
    assert len(sentences) == 3
    best = max((r for r in results if r["fraction"] == 0.05), key=lambda r: r["accuracy"])
    assert summary["best"]["accuracy"] == best["accuracy"]
    assert sentences[0].startswith("At 5% of the training images (the paper's protocol point), the best is")
    assert f"{best['accuracy']:.1f} ± {best['accuracy_std']:.1f} %" in sentences[0]
    assert f"95 % CI {best['accuracy_ci95'][0]:.1f} to {best['accuracy_ci95'][1]:.1f}" in sentences[0]
    first, last = summary["roi_effect"]["by_column"]
    # 97 % against 60 % at 100 % is a sure gain; 55 % against 50 % on 30 test images is not.
    assert (first["verdict"], last["verdict"]) == ("unclear", "helps")
    assert sentences[1].startswith("Focusing on the ROI helps at 100% and makes no clear difference at 5%: the best row with "
                                   "the ROI minus the best whole-image row is ")
    assert f"is {first['difference']:+.1f} points at 5% (95 % CI {first['ci95'][0]:+.1f} to {first['ci95'][1]:+.1f})" in sentences[1]
    assert sentences[1].endswith(f" and {last['difference']:+.1f} at 100% ({last['ci95'][0]:+.1f} to {last['ci95'][1]:+.1f}).")
    assert "reports no numbers for toy; it covers covid, brain_tumor" in sentences[2]

    paper = {"MedFocusCLIP": {0.05: 71.15, 1.0: 93.94}, "CLIP": {0.05: 66.0}}
    compared = summarize(results, runs, dataset=DATASET, models=MODELS, paper=paper, paper_datasets=["toy"], chosen=CHOSEN)
    assert compared["paper"]["difference"] == round(best["accuracy"] - 71.15, 2)
    assert f"MedFocusCLIP at 71.2 % on toy at 5% (CLIP about 66.0 %); the best row here is {best['accuracy'] - 71.15:+.1f} points" in headline(compared)[2]
    assert [row["label"] for row in compared["paper_rows"]] == ["MedFocusCLIP (paper)", "CLIP (paper)"]
    assert compared["paper_rows"][1]["cells"] == {"5%": 66.0, "100%": None}


def test_without_the_5_percent_point_the_headline_says_which_subset():
    runs = _runs({("medfocus", "none"): {0.1: 0.5, 1.0: 0.6}, ("medfocus", "dual"): {0.1: 0.6, 1.0: 0.9}})
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=[], chosen=None)
    assert summary["protocol_point"] == {"column": "10%", "fraction": 0.1, "shots": None, "is_paper_point": False}
    assert headline(summary)[0].startswith("At 10% (the smallest evaluated subset; the paper's 5 % was not evaluated)")


def test_random_init_comes_first_and_loud(toy):
    runs, results, _ = toy
    models = MODELS | {"encoder": MODELS["encoder"] | {"name": "ViT-B-32", "weights": "random-init", "random_init": True}}
    summary = summarize(results, runs, dataset=DATASET, models=models, paper=None, paper_datasets=[], chosen=CHOSEN)
    sentences = headline(summary)
    assert sentences[0].startswith("RANDOM-INIT: NOT REAL RESULTS. The image encoder (ViT-B-32) had no pretrained weights")
    text = render_text(summary)
    first_numbered = re.search(r"^(\S+) ", text.split("\n\n")[1], re.M).group(1)
    assert first_numbered == "!!"  # the warning line comes before the numbered sentences


def test_terminal_text_holds_the_headline_table_and_per_class(toy):
    _, results, summary = toy
    text = render_text(summary, "cache/toy/metrics.json")
    for sentence in headline(summary):
        assert sentence in text
    assert "encoder litemedsam (pretrained:litemedsam, sha256 abababababab)" in text and "Dice 0.87, IoU 0.78" in text
    row = _result(results, "medfocus", "dual", 1.0)
    assert re.search(rf"medfocus, ROI: dual\s+.*{row['accuracy']:.1f} ± {row['accuracy_std']:.1f} \*", text)
    assert text.count("linear_probe ") >= 1 and "linear_probe, whole image" not in text
    assert "per class: medfocus (dual) at 100%" in text and "chosen in advance: train.method/train.mode" in text
    effect = summary["roi_effect"]["by_column"][-1]
    cells = ["100%", "medfocus, ROI: dual", f"{effect['roi']['accuracy']:.1f}", "linear_probe", f"{effect['whole']['accuracy']:.1f}",
             f"{effect['difference']:+.1f}", f"{effect['ci95'][0]:+.1f} to {effect['ci95'][1]:+.1f}"]
    assert re.search("^" + r"\s+".join(map(re.escape, cells)) + "$", text, re.M)
    assert text.rstrip().endswith("all runs and metrics: cache/toy/metrics.json")


def test_features_without_a_segmenter_say_so_instead_of_naming_none():
    runs = _runs({("linear_probe", "none"): {0.05: 0.6}})
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS | {"segmenter": None}, paper=None,
                        paper_datasets=[], chosen=None)
    text = render_text(summary, "cache/toy/metrics.json")
    assert "no segmenter (no evaluated mode uses an ROI)" in text and "None" not in text


def test_methods_that_could_not_run_are_named():
    runs = _runs({("medfocus", "none"): {1.0: 0.5}})
    skipped = {"zero_shot/none": "zero_shot needs class prompt embeddings; methods that work without text: ...",
               "medfocus_dual/none": "medfocus_dual needs the ROI view"}
    summary = summarize(_results(runs), runs, dataset=DATASET, models=MODELS, paper=None, paper_datasets=[], chosen=None,
                        skipped=skipped)
    assert summary["not_run"] == {"zero_shot": "zero_shot needs class prompt embeddings", "medfocus_dual": "medfocus_dual needs the ROI view"}
    assert "(not run: zero_shot: zero_shot needs class prompt embeddings)" in render_text(summary)
