"""ROI ground truth as boxes (roi-eval --boxes), fitting a policy file (roi-fit), and policy files as segment.policy.

Images are small and generated: a bright disk (the "lesion") at a known place on a smooth random background, its box
written as YOLO text files and as a CSV. Fitting runs on a stand-in decoder (a box prompt gives the box as its mask),
so it takes seconds; one test segments three images with the real LiteMedSAM through a policy file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfocus.pipeline.config import ConfigError, parse_params
from medfocus.pipeline.segmenters import selection
from medfocus.pipeline.segmenters.base import WORK_SIZE, SegmentationResult
from medfocus.pipeline.segmenters.policies import (
    BUILTIN_POLICY_DIR,
    POLICIES,
    PolicyFileError,
    RoiPolicy,
    get_policy,
    parse_policy_file,
    policy_file_from,
    read_policy_file,
)
from medfocus.pipeline.specs import resolve_segment
from medfocus.stages.cli import app

SIZE = 96
CLASSES = ("alpha", "beta")


# Models run on one torch thread here (two pytest workers share the cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- generated data ----------------------------------------------------------------------------------------------------


def blob_image(rng: np.random.Generator, centre: tuple[float, float] | None, radius: float) -> np.ndarray:
    """A smooth random background (60-120) with a bright disk (230) at ``centre`` (fractions), or none."""
    coarse = rng.uniform(60, 120, size=(6, 6)).astype(np.float32)
    background = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    gray = background + rng.normal(0, 3, size=(SIZE, SIZE))
    if centre is not None:
        ys, xs = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
        gray = np.where((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius**2, 230, gray)
    return np.clip(gray, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: int = 12, no_lesion: int = 0, seed: int = 0) -> dict:
    """images/<class>/<N>.png, boxes/<class>/<N>.txt (YOLO), masks/<class>/<N>_mask.png, boxes.csv (pixels).

    The last ``no_lesion`` images of each class have no disk: an empty .txt file for the first of them, no file for the
    rest, an empty mask and no CSV row."""
    rng = np.random.default_rng(seed)
    truth = {}
    rows = [["path", "x0", "y0", "x1", "y1"]]
    for class_name in CLASSES:
        for folder in ("images", "boxes", "masks"):
            (root / folder / class_name).mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            relative = f"{class_name}/{number}"
            lesion = number < per_class - no_lesion
            radius = rng.uniform(0.08, 0.12)
            centre = tuple(rng.uniform(0.2, 0.8, size=2)) if lesion else None
            gray = blob_image(rng, centre, radius)
            Image.fromarray(gray).save(root / "images" / f"{relative}.png")
            Image.fromarray(((gray == 230) * 255).astype(np.uint8)).save(root / "masks" / f"{relative}_mask.png")
            if lesion:
                box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
                (root / "boxes" / f"{relative}.txt").write_text(f"0 {centre[0]:.6f} {centre[1]:.6f} {2 * radius:.6f} {2 * radius:.6f}\n")
                rows.append([f"{relative}.png", *(f"{value * SIZE:.3f}" for value in box)])
                truth[relative] = box
            elif number == per_class - no_lesion:
                (root / "boxes" / f"{relative}.txt").write_text("")
    with open(root / "boxes.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return truth


class BoxMaskDecoder:
    """Stands in for a SAM decoder: every box prompt gives the box itself as the mask; the predicted IoU says nothing."""

    def decode_boxes(self, boxes: np.ndarray):
        coords = (torch.arange(WORK_SIZE, dtype=torch.float32) + 0.5) / WORK_SIZE
        logits = []
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32):
            inside = ((coords[None, :] >= x0) & (coords[None, :] <= x1)) & ((coords[:, None] >= y0) & (coords[:, None] <= y1))
            logits.append(torch.where(inside, 5.0, -5.0))
        return torch.stack(logits)[:, None].repeat(1, 4, 1, 1), torch.full((len(boxes), 4), 0.8)


class StandInSegmenter:
    """A segmenter with the stand-in decoder: ``embed`` for roi-fit, ``segment`` runs its policy (selection.run)."""

    def __init__(self, policy, store_resolution: int = 64, **_):
        self.policy = get_policy(policy)
        self.store_resolution = store_resolution

    def describe(self) -> dict:
        return {"backend": "stand-in", "checkpoint_sha256": "stand-in", "policy": self.policy.describe()}

    def embed(self, image: np.ndarray) -> BoxMaskDecoder:
        return BoxMaskDecoder()

    def segment(self, image: np.ndarray) -> SegmentationResult:
        return selection.run(self.policy, selection.grayscale_work_image(image), BoxMaskDecoder(), self.store_resolution)


class BrightSegmenter:
    """ROI = the pixels brighter than 200 (the disk): box IoU about 1 where there is a disk, no ROI where there is none."""

    def describe(self) -> dict:
        return {"backend": "bright"}

    def segment(self, image: np.ndarray) -> SegmentationResult:
        roi = np.asarray(Image.fromarray(image[:, :, 0]).resize((64, 64), Image.Resampling.NEAREST)) > 200
        found = bool(roi.any())
        return SegmentationResult(labels=roi.astype(np.uint16), roi=roi, masks=[{"source": "bright"}] if found else [],
                                  roi_index=0 if found else None)


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def params_path(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("segment: {scheduler: synchronous, workers: 1}\n")
    return path


# --- roi-eval with boxes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["yolo", "csv"])
def test_roi_eval_boxes_scores_known_boxes(tmp_path, params_path, monkeypatch, form):
    import medfocus.pipeline.segmenters as segmenters

    data = tmp_path / "data"
    make_dataset(data, per_class=4, no_lesion=2)
    monkeypatch.setattr(segmenters, "create_segmenter", lambda **options: BrightSegmenter())
    boxes = data / "boxes" if form == "yolo" else data / "boxes.csv"
    report_path = tmp_path / "report.json"
    invoke("roi-eval", "--dataset", "blobs", "--root", str(data / "images"), "--boxes", str(boxes), "--params",
           str(params_path), "--cache-dir", str(tmp_path / "cache"), "-o", str(report_path), "-q")
    report = json.loads(report_path.read_text())
    assert report["ground_truth"]["kind"] == ("yolo-boxes" if form == "yolo" else "csv-boxes")
    lesion, empty = report["lesion"], report["empty_gt"]
    assert lesion["n"] == lesion["n_boxed"] == 4 and empty["n"] == 4  # an empty .txt file and a missing one: no lesion
    assert lesion["box_iou"] > 0.85 and lesion["hit_rate"] == 1.0
    assert empty["roi_area"] == 0.0 and empty["roi_found_rate"] == 0.0 and empty["n_boxed"] == 0
    assert set(report["per_class"]) == set(CLASSES) and report["per_class"]["alpha"]["n_boxed"] == 2
    assert "dice" not in lesion  # no masks given


def test_roi_eval_masks_and_boxes_together(tmp_path):
    from medfocus.pipeline.segmenters import evaluate_roi
    from medfocus.pipeline.segmenters.roi_eval import list_class_images

    data = tmp_path / "data"
    make_dataset(data, per_class=3, no_lesion=1)
    items = list_class_images(data / "images")
    report = evaluate_roi(BrightSegmenter(), items, data / "masks", images_root=data / "images", boxes=data / "boxes")
    assert report["lesion"]["n"] == 4 and report["lesion"]["dice"] > 0.9 and report["lesion"]["box_iou"] > 0.85
    assert report["empty_gt"]["dice"] == 1.0  # no ROI where the mask is empty


def test_box_measures_and_the_union_of_several_boxes(tmp_path):
    from medfocus.pipeline.segmenters.roi_eval import GroundTruth, box_iou, box_scores, read_yolo_boxes

    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
    roi = np.zeros((100, 100), bool)
    roi[0:50, 0:50] = True
    assert box_scores(roi, (0.0, 0.0, 0.5, 0.5)) == {"box_iou": pytest.approx(1.0), "box_hit": 1.0}
    assert box_scores(roi, (0.25, 0.0, 0.75, 0.5))["box_hit"] == 1.0  # covers exactly half
    assert box_scores(roi, (0.3, 0.0, 0.8, 0.5))["box_hit"] == 0.0
    assert box_scores(np.zeros((8, 8), bool), (0.1, 0.1, 0.2, 0.2)) == {"box_iou": 0.0, "box_hit": 0.0}
    (tmp_path / "boxes" / "a").mkdir(parents=True)
    (tmp_path / "boxes" / "a" / "1.txt").write_text("0 0.2 0.2 0.2 0.2\n\n1 0.7 0.6 0.2 0.4\n")
    truth = GroundTruth(boxes=tmp_path / "boxes")
    box, count = truth.truth_box(tmp_path / "images" / "a" / "1.png", tmp_path / "images", (10, 10), None)
    assert count == 2 and box == pytest.approx((0.1, 0.1, 0.8, 0.8))
    (tmp_path / "bad.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        read_yolo_boxes(tmp_path / "bad.txt")


# --- roi-fit -----------------------------------------------------------------------------------------------------------

START_POLICY = {
    "format": "medfocus-roi-policy", "version": 1, "name": "start", "summary": "whole image, grid and bright blobs",
    "proposals": [{"kind": "whole-image"}, {"kind": "grid", "scales": [0.3, 0.6], "steps": 3},
                  {"kind": "blobs", "polarity": "bright", "count": 3, "sigma_scales": [2.0], "half_sides": [0.1],
                   "detector_scales": [0.05]}],
    "decoding": {"mask_outputs": "single"}, "refinement": {"steps": 1}, "selection": {"weights": {"iou": 1.0}},
}


@pytest.mark.parametrize("truth", ["masks", "boxes", "csv"])
def test_roi_fit_writes_a_policy_that_beats_the_whole_image(tmp_path, params_path, monkeypatch, truth):
    from medfocus.pipeline.segmenters import policy_fit

    data = tmp_path / "data"
    make_dataset(data, per_class=12, no_lesion=1)
    start = tmp_path / "start.json"
    start.write_text(json.dumps(START_POLICY))
    monkeypatch.setattr(policy_fit, "fit_segmenter", lambda build: StandInSegmenter(build["policy"]))
    output = tmp_path / "policies" / "blob-fitted.json"
    ground_truth = {"masks": ["--masks", str(data / "masks")], "boxes": ["--boxes", str(data / "boxes")],
                    "csv": ["--boxes", str(data / "boxes.csv")]}[truth]
    result = invoke("roi-fit", "--dataset", "blobs", "--root", str(data / "images"), *ground_truth, "--start-from", str(start),
                    "--group-by", "number:3", "--holdout-fraction", "0.5", "--params", str(params_path), "--cache-dir",
                    str(tmp_path / "cache"), "-o", str(output), "-q")
    assert json.loads(result.stdout)["policy_file"] == str(output)
    fitted = read_policy_file(output)
    assert fitted.name == "blob-fitted" and fitted.version == 1
    assert [p.kind for p in fitted.proposals] == ["whole-image", "grid", "blobs"]  # the start policy's proposals
    assert fitted.selection.weights != {"iou": 1.0}
    held = fitted.held_out
    assert held.n >= 3 and held.box_iou > held.whole_image_box_iou + 0.3, held
    assert held.box_iou > held.start_policy_box_iou
    assert (held.dice is not None) == (truth == "masks")
    provenance = fitted.fitted
    assert provenance.dataset == "blobs" and provenance.started_from == str(start)
    assert provenance.ground_truth.kind == {"masks": "masks", "boxes": "yolo-boxes", "csv": "csv-boxes"}[truth]
    counts = provenance.counts
    assert counts["tune"] + counts["held_out"] == counts["images"] == 24
    assert counts["tune_no_lesion"] + counts["held_out_no_lesion"] == 2
    assert "number" in provenance.split.rule and provenance.medfocus_version and provenance.date
    # The file is a policy: segment.policy takes it, and the runtime policy is the start's with the fitted weights.
    policy = get_policy(str(output))
    assert dict(policy.weights) == fitted.selection.weights and policy.blob_polarity == "bright"
    assert parse_params({"segment": {"policy": str(output)}}).segment.policy == str(output)


def test_holdout_split_keeps_number_blocks_together_and_is_stable(tmp_path):
    from medfocus.pipeline.segmenters.policy_fit import holdout_split

    root = tmp_path
    items = [(root / c / f"{n}.jpg", c) for c in ("x", "y") for n in range(100, 160)]
    tune, held, split = holdout_split(items, root, group_by="number:10", holdout_fraction=0.4, seed=3)
    assert tune and held and len(tune) + len(held) == len(items)
    side = {(Path(p).parent.name, int(Path(p).stem) // 10): p in {q for q, _ in held} for p, _ in items}
    for path, _ in items:
        assert ((path, _) in held) == side[(path.parent.name, int(path.stem) // 10)]
    assert holdout_split(items[::-1], root, group_by="number:10", holdout_fraction=0.4, seed=3)[1] == held[::-1]
    more = items + [(root / "x" / "999.jpg", "x")]
    assert set(held) <= set(holdout_split(more, root, group_by="number:10", holdout_fraction=0.4, seed=3)[1])
    _, by_number, rule = holdout_split(items, root, holdout_from=150)
    assert {int(p.stem) for p, _ in by_number} == set(range(150, 160)) and rule.holdout_from == 150
    regex = holdout_split([(root / "x" / "p7_s1.jpg", "x"), (root / "x" / "p7_s2.jpg", "x")], root,
                          group_by=r"regex:(p\d+)_", holdout_fraction=0.5, seed=0)
    assert sorted(map(len, regex[:2])) == [0, 2]  # one patient: both slices on one side
    with pytest.raises(ValueError, match="group-by"):
        holdout_split(items, root, group_by="number:zero")


# --- policy files ------------------------------------------------------------------------------------------------------

# The built-in policies as they were Python literals in pipeline/segmenters/policies.py before they became files: their
# content must not change (same proposals, same weights), so results and stores stay what they were.
OLD_LITERALS = {
    "whole-image": RoiPolicy(name="whole-image", summary="one box prompt covering the whole image (the naive baseline)"),
    "centre-box": RoiPolicy(name="centre-box", summary="one central box prompt covering the middle half of each side "
                            "(fixed-box baseline)", whole_box=False, center_side=0.5),
    "grid-score": RoiPolicy(
        name="grid-score", summary="whole image + centre + 2 scales x 3x3 grid boxes, ranked by predicted IoU, stability, "
        "prompt agreement and border contact, one refinement", center_side=0.5, grid_scales=(0.35, 0.6), refine_steps=1,
        weights={"iou": 1.0, "stability": 0.5, "consensus": 1.0, "border": -1.0}),
    "dark-blob": RoiPolicy(
        name="dark-blob", summary="whole image + 4 dark blobs x 3 box sizes, every mask output, ranked by a linear score "
        "fitted on the BUSI tune half, one refinement of the best mask", blob_polarity="dark", blob_count=4,
        blob_sigma_scales=(2.5,), blob_half_sides=(0.1, 0.28), mask_outputs="all", refine_steps=1,
        weights={"iou": 1.511, "stability": -0.9933, "log_area": 0.62, "log_area_sq": -0.01896, "border": -14.65,
                 "darkness": 1.223, "inside_offset": -7.398, "inside_std": 11.3, "edge": 1.784, "fill": 1.362,
                 "consensus": 12.85, "support": -7.204, "centre_y": -4.064, "centre_x_offset": -3.62,
                 "box_touch": -0.521, "seed_rank": -0.0461, "whole": -0.9126}),
    "demo-lesion": RoiPolicy(
        name="demo-lesion", summary="whole image + 4 dark blobs at the demo lesions' scale x 2 box sizes, every mask "
        "output, ranked by a linear score fitted on the demo's tune half, one refinement of the best mask",
        blob_polarity="dark", blob_count=4, blob_scales=(0.05,), blob_surround=3.0, blob_sigma_scales=(2.0, 3.0),
        mask_outputs="all", refine_steps=1, min_area=0.005, max_area=0.2,
        weights={"iou": 0.3219, "stability": 0.6284, "log_area": -0.4624, "log_area_sq": 0.05117, "border": -9.734,
                 "darkness": 0.9083, "inside_offset": -6.358, "inside_std": -3.574, "edge": 1.294, "fill": -2.892,
                 "consensus": 4.099, "support": 0.2228, "centre_y": -0.558, "centre_x_offset": -1.404,
                 "box_touch": 1.349, "seed_rank": -0.3305}),
}


def test_builtin_policies_are_shipped_files_with_the_old_content():
    # The policies that were Python literals, plus those fitted since as files (brain-mri, brain-mri-map).
    assert sorted(POLICIES) == sorted(p.stem for p in BUILTIN_POLICY_DIR.glob("*.json"))
    assert set(OLD_LITERALS) | {"brain-mri", "brain-mri-map"} == set(POLICIES)
    for name, old in OLD_LITERALS.items():
        assert POLICIES[name].describe() == old.describe(), name
        assert get_policy(name) is POLICIES[name]
        assert policy_file_from(old).to_policy().describe() == old.describe()  # the file format round-trips
    segment = resolve_segment(parse_params({"segment": {"policy": "dark-blob"}}).segment, "x")
    assert segment.build_options["policy"] == "dark-blob" and segment.content["policy"] == OLD_LITERALS["dark-blob"].describe()
    assert resolve_segment(parse_params({}).segment, "demo").content["policy"]["name"] == "demo-lesion"  # auto


def write_fitted(path: Path, weights: dict | None = None, indent: int | None = 2, shuffle: bool = False) -> Path:
    raw = json.loads(policy_file_from(POLICIES["grid-score"]).dump())
    raw["name"] = "my-policy"
    if weights is not None:
        raw["selection"]["weights"] = weights
    if shuffle:
        raw = dict(reversed(list(raw.items())))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=indent))
    return path


def test_the_segment_spec_hashes_the_policy_file_content_not_its_path(tmp_path, monkeypatch):
    from medfocus.pipeline.current_stores import _resolved_from
    from medfocus.pipeline.datasets import resolve_dataset

    def resolved(path: Path):
        params = parse_params({"segment": {"policy": str(path)}})
        spec = resolve_segment(params.segment, "x")
        return spec, _resolved_from(resolve_dataset("x", tmp_path, params), params)["segment"]

    first, first_from = resolved(write_fitted(tmp_path / "a" / "policy.json"))
    assert first.content["policy"]["name"] == "my-policy" and first.build_options["policy"] == first.content["policy"]
    assert str(tmp_path) not in json.dumps(first.content)  # no path in the spec
    moved, _ = resolved(write_fitted(tmp_path / "b" / "renamed.json", indent=None, shuffle=True))
    assert moved.key == first.key  # moved, renamed, reformatted: the same policy
    monkeypatch.chdir(tmp_path / "b")
    assert resolved(Path("renamed.json"))[0].key == first.key  # a relative path is read from the working directory
    refitted, refitted_from = resolved(write_fitted(tmp_path / "a" / "policy.json", weights={"iou": 1.0, "border": -2.0}))
    assert refitted.key != first.key and refitted_from != first_from  # same path, new content: resolved and keyed anew
    builtin = resolve_segment(parse_params({"segment": {"policy": "grid-score"}}).segment, "x")
    assert builtin.key != first.key


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda raw: raw["selection"].update(colour="red"), "unknown key 'selection.colour'"),
        (lambda raw: raw.update(extra=1), "unknown key 'extra'"),
        (lambda raw: raw["proposals"].append({"kind": "spiral"}), "unknown proposal kind 'spiral'"),
        (lambda raw: raw["selection"]["weights"].update(lesion_likelihood=1.0), "lesion_likelihood"),
        (lambda raw: raw.update(version=7), "version 7"),
        (lambda raw: raw["proposals"].append({"kind": "whole-image"}), "more than once"),
        (lambda raw: raw["proposals"][1].update(side=2), "proposals.1.centre.side"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_key(tmp_path, params_path, edit, named):
    raw = json.loads(write_fitted(tmp_path / "p.json").read_text())
    edit(raw)
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(PolicyFileError, match=named):
        read_policy_file(tmp_path / "p.json")
    result = invoke("segment", "--dataset", "x", "--root", str(tmp_path), "--policy", str(tmp_path / "p.json"), "--params",
                    str(params_path), "--cache-dir", str(tmp_path / "cache"), code=2)
    assert named in result.output and "--policy" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache" / "x" / "masks").exists()  # no store written with an unreadable policy


def test_malformed_and_missing_policy_files(tmp_path, params_path):
    (tmp_path / "broken.json").write_text('{"format": "medfocus-roi-policy", ')
    with pytest.raises(PolicyFileError, match="not valid JSON"):
        read_policy_file(tmp_path / "broken.json")
    with pytest.raises(PolicyFileError, match="not a medfocus ROI policy file"):
        parse_policy_file('{"weights": {}}')
    (tmp_path / "params.yaml").write_text(f"segment: {{policy: {tmp_path / 'broken.json'}}}\n")
    result = invoke("resolve", "--dataset", "x", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"),
                    "--cache-dir", str(tmp_path / "cache"), code=2)
    assert "segment.policy" in result.output and "not valid JSON" in result.output
    with pytest.raises(ConfigError, match="no-such.json"):
        parse_params({"segment": {"policy": "no-such.json"}})


def test_segment_with_a_policy_file_uses_it(tmp_path, params_path):
    """The real LiteMedSAM, three small images, a one-prompt policy file: the store's spec holds the file's policy."""
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    (data / "a").mkdir(parents=True)
    for number in range(3):
        Image.fromarray(blob_image(rng, (0.3 + 0.2 * number, 0.5), 0.1)).save(data / "a" / f"{number}.png")
    raw = json.loads(policy_file_from(POLICIES["centre-box"]).dump()) | {"name": "my-centre"}
    (tmp_path / "mine.json").write_text(json.dumps(raw))
    invoke("segment", "--dataset", "tiny", "--root", str(data), "--policy", str(tmp_path / "mine.json"), "--params",
           str(params_path), "--cache-dir", str(tmp_path / "cache"), "-q")
    summary = json.loads((tmp_path / "cache" / "tiny" / "segment.json").read_text())
    assert summary["policy"] == "my-centre"
    assert summary["spec"]["policy"] == POLICIES["centre-box"].describe() | {"name": "my-centre"}
    shutil.move(tmp_path / "mine.json", tmp_path / "moved.json")
    result = invoke("segment", "--dataset", "tiny", "--root", str(data), "--policy", str(tmp_path / "moved.json"), "--params",
                    str(params_path), "--cache-dir", str(tmp_path / "cache"), "-q")
    assert json.loads(result.stdout)["processed"] == 0  # moved: the same store, nothing to redo


def test_resolving_a_policy_file_imports_no_torch(tmp_path):
    """The resolve stage (every `dvc repro`) reads and hashes a policy file without importing torch."""
    import os
    import subprocess
    import sys

    path = write_fitted(tmp_path / "p.json")
    code = ("import sys\nfrom medfocus.pipeline.config import parse_params\nfrom medfocus.pipeline.specs import resolve_segment\n"
            f"spec = resolve_segment(parse_params({{'segment': {{'policy': {str(path)!r}}}}}).segment, 'x')\n"
            "print(spec.content['policy']['name'], 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.split() == ["my-policy", "False"], result.stderr


def test_roi_eval_and_roi_fit_need_ground_truth(tmp_path, params_path):
    common = ["--dataset", "x", "--root", str(tmp_path), "--params", str(params_path), "--cache-dir", str(tmp_path / "cache")]
    assert "--masks" in invoke("roi-eval", *common, code=2).output
    result = invoke("roi-fit", *common, "--boxes", str(tmp_path / "absent"), "-o", str(tmp_path / "p.json"), code=2)
    assert "absent" in result.output and not (tmp_path / "p.json").exists()
    result = invoke("roi-fit", *common, "--boxes", str(tmp_path), "--start-from", "dark_blob", "-o", str(tmp_path / "p.json"), code=2)
    assert "--start-from" in result.output and "'dark-blob'" in result.output


def test_blobs_inside_the_foreground_skip_the_skull():
    """Brain MRI: the skull and scalp are the brightest blobs of a slice; with ``foreground_erosion`` only centres inside
    the head, away from its rim, are proposed."""
    import numpy as np

    from medfocus.pipeline.segmenters.selection import find_blobs, foreground_interior

    size = 256
    yy, xx = np.mgrid[0:size, 0:size] / size
    radius = np.hypot(xx - 0.5, yy - 0.5)
    gray = np.where(radius < 0.4, 0.3, 0.0).astype(np.float32)       # the head
    gray[(radius > 0.37) & (radius < 0.4)] = 1.0                      # a bright skull ring
    gray[np.hypot(xx - 0.5, yy - 0.88) < 0.03] = 1.0                  # a bright spot on the rim (scalp)
    gray[np.hypot(xx - 0.42, yy - 0.45) < 0.03] = 0.7                 # the tumour: weaker, inside
    interior = foreground_interior(gray, 0.07).numpy()
    assert interior[int(0.45 * size), int(0.42 * size)] and not interior[int(0.88 * size), int(0.5 * size)]
    anywhere = find_blobs(gray, "bright", 1, sigmas=(0.02,))
    inside = find_blobs(gray, "bright", 1, sigmas=(0.02,), foreground_erosion=0.07)
    assert abs(anywhere[0].cy - 0.45) > 0.1  # the rim wins without the restriction
    assert abs(inside[0].cx - 0.42) < 0.03 and abs(inside[0].cy - 0.45) < 0.03


def test_the_brain_mri_policy_is_the_brain_tumor_default_and_records_its_fit():
    from medfocus.pipeline.segmenters.policies import default_policy_for, get_policy, read_policy_file

    assert default_policy_for("brain_tumor") == "brain-mri-map"
    mapped = get_policy("brain-mri-map")
    assert mapped.has_map and len(mapped.map_weights) == 256 and mapped.weights["from_map"] > 0
    assert mapped.blob_polarity == "bright" and mapped.map_thresholds == (0.3, 0.5)
    policy = get_policy("brain-mri")
    assert policy.blob_polarity == "bright" and policy.blob_foreground_erosion == 0.07
    shipped = read_policy_file(Path(__file__).resolve().parents[1] / "pipeline" / "segmenters" / "builtin_policies" / "brain-mri.json")
    assert shipped.fitted.dataset == "brain_tumor_boxes" and shipped.held_out.n == 160
    assert shipped.held_out.box_iou > 5 * shipped.held_out.whole_image_box_iou


MAP_START_POLICY = {
    "format": "medfocus-roi-policy", "version": 1, "name": "map-start", "summary": "whole image and an embedding map",
    "proposals": [{"kind": "whole-image"}, {"kind": "embedding-map", "thresholds": [0.3, 0.5]}],
    "decoding": {"mask_outputs": "single"}, "selection": {"weights": {"iou": 1.0}},
}


def test_roi_fit_fits_an_embedding_map_on_litemedsam_and_segment_runs_it(tmp_path, params_path):
    """The real LiteMedSAM: roi-fit fits a scorer over its embedding cells that finds the disks; the fitted file
    segments, and a segmenter that cannot run the map (unfitted, other weights, the SAM2 backend) is refused."""
    from medfocus.pipeline.segmenters.litemedsam import LiteMedSAMSegmenter
    from medfocus.pipeline.segmenters.sam2_segmenter import Sam2Segmenter

    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    start = tmp_path / "map-start.json"
    start.write_text(json.dumps(MAP_START_POLICY))
    with pytest.raises(ValueError, match="never fitted"):
        LiteMedSAMSegmenter(policy=str(start))
    output = tmp_path / "map-fitted.json"
    invoke("roi-fit", "--dataset", "blobs", "--root", str(data / "images"), "--boxes", str(data / "boxes"),
           "--start-from", str(start), "--group-by", "number:2", "--holdout-fraction", "0.5", "--params", str(params_path),
           "--cache-dir", str(tmp_path / "cache"), "-o", str(output), "-q")
    fitted = read_policy_file(output)
    segmenter = LiteMedSAMSegmenter(policy="whole-image")
    scorer = fitted.proposals[1]
    assert scorer.kind == "embedding-map" and len(scorer.weights) == 256 and scorer.segmenter_sha256 == segmenter.checkpoint
    assert "embedding map and score weights fitted" in fitted.summary
    held = fitted.held_out
    assert held.box_iou > held.whole_image_box_iou + 0.4 and held.hit_rate >= 0.75, held

    # The map alone finds the disk: its first box covers most of each held-out disk's box.
    policy = get_policy(str(output))
    image = np.asarray(Image.open(data / "images" / "alpha" / "0.png").convert("RGB"))
    source, box, features = selection.proposals(policy, selection.grayscale_work_image(image), segmenter.embed(image))[1]
    truth = [float(v) for v in (data / "boxes" / "alpha" / "0.txt").read_text().split()[1:]]
    truth_box = (truth[0] - truth[2] / 2, truth[1] - truth[3] / 2, truth[0] + truth[2] / 2, truth[1] + truth[3] / 2)
    from medfocus.pipeline.segmenters.roi_eval import box_iou

    assert source.startswith("embedding map") and features == {"from_map": 1.0} and box_iou(box, truth_box) > 0.4

    result = invoke("segment", "--dataset", "blobs", "--root", str(data / "images"), "--policy", str(output), "--params",
                    str(params_path), "--cache-dir", str(tmp_path / "cache"), "-q")
    assert json.loads(result.stdout)["processed"] == 16
    summary = json.loads((tmp_path / "cache" / "blobs" / "segment.json").read_text())
    assert summary["spec"]["policy"]["map_weights"] == scorer.weights

    raw = json.loads(output.read_text())
    raw["proposals"][1]["segmenter_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="refit it with medfocus roi-fit"):
        LiteMedSAMSegmenter(policy=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="use segment.backend litemedsam"):
        Sam2Segmenter(policy=str(output))
    del raw["proposals"][1]["bias"]
    (tmp_path / "partial.json").write_text(json.dumps(raw))
    with pytest.raises(PolicyFileError, match="come together"):
        read_policy_file(tmp_path / "partial.json")
