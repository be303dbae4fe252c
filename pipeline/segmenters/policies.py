"""ROI policies as data: which box prompts to try and how to score the masks they give (:mod:`.selection` runs them).

Policies are data (:data:`POLICIES`): pick one by name in params; :data:`DEFAULT_POLICY_BY_DATASET` says which
one each dataset uses by default and why (measured numbers are in benchmarks/README.md). This module imports no
torch: the resolve stage, run on every ``dvc repro``, describes the policy in the mask store's spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

BLOB_SCALES = (0.025, 0.05, 0.1)
BLOB_SURROUND = 2.0


FEATURE_NAMES = (
    "iou",  # decoder's predicted IoU
    "stability",  # IoU of the masks at logit +1 and -1
    "log_area",  # log of the area fraction
    "log_area_sq",  # its square: lets a linear score prefer a middle size
    "border",  # fraction of the image border the mask covers
    "darkness",  # (ring mean - inside mean) / image std; > 0 for a region darker than its surroundings
    "inside_offset",  # inside mean - image mean, in [0, 1] gray units
    "inside_std",  # gray-level spread inside the mask
    "edge",  # mean gradient magnitude on the mask outline / image mean gradient
    "fill",  # area / bounding-box area
    "consensus",  # mean IoU with the other candidates
    "support",  # fraction of the other candidates overlapping it with IoU >= 0.5
    "centre_y",  # centroid height, 0 = top
    "centre_x_offset",  # |centroid x - 0.5|
    "box_touch",  # fraction of its prompt box's sides the mask reaches (a cut-off object touches them)
    "seed_rank",  # rank of the blob that seeded its prompt (0: not blob-seeded)
    "whole",  # 1 if prompted by the whole-image box
    "refined",  # 1 if prompted by a refinement box
)


MASK_OUTPUTS = {"single": (0,), "multi": (1, 2, 3), "all": (0, 1, 2, 3)}


@dataclass(frozen=True)
class RoiPolicy:
    """One ROI strategy, as data. :mod:`.selection` documents the steps these fields drive."""

    name: str
    summary: str
    whole_box: bool = True
    center_side: float | None = None
    grid_scales: tuple[float, ...] = ()
    grid_steps: int = 3
    blob_polarity: str | None = None
    blob_count: int = 0
    blob_sigma_scales: tuple[float, ...] = (2.5,)  # box half-sides as multiples of the blob's scale
    blob_half_sides: tuple[float, ...] = ()  # box half-sides as fixed fractions of the image side
    blob_scales: tuple[float, ...] = BLOB_SCALES  # blob detector scales (find_blobs' sigmas)
    blob_surround: float = BLOB_SURROUND  # its surround-to-centre scale ratio
    mask_outputs: str = "single"
    refine_steps: int = 0
    refine_top: int = 1
    refine_margin: float = 0.15
    weights: Mapping[str, float] = field(default_factory=lambda: {"iou": 1.0})
    min_area: float = 0.002
    max_area: float = 0.9
    decode_batch: int = 1  # prompts per decoder call; one at a time is fastest on CPU

    def __post_init__(self) -> None:
        if self.mask_outputs not in MASK_OUTPUTS:
            raise ValueError(f"mask_outputs must be one of {sorted(MASK_OUTPUTS)}, got {self.mask_outputs!r}")
        unknown = set(self.weights) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)} in weights; known: {FEATURE_NAMES}")

    def describe(self) -> dict:
        description = dataclasses.asdict(self)
        description["weights"] = dict(sorted(self.weights.items()))
        for name in ("grid_scales", "blob_sigma_scales", "blob_half_sides", "blob_scales"):
            description[name] = list(description[name])
        return description


POLICIES: dict[str, RoiPolicy] = {
    policy.name: policy
    for policy in (
        RoiPolicy(
            name="whole-image",
            summary="one box prompt covering the whole image (the naive baseline)",
        ),
        RoiPolicy(
            name="centre-box",
            summary="one central box prompt covering the middle half of each side (fixed-box baseline)",
            whole_box=False,
            center_side=0.5,
        ),
        RoiPolicy(
            name="grid-score",
            summary="whole image + centre + 2 scales x 3x3 grid boxes, ranked by predicted IoU, stability, "
            "prompt agreement and border contact, one refinement",
            center_side=0.5,
            grid_scales=(0.35, 0.6),
            refine_steps=1,
            weights={"iou": 1.0, "stability": 0.5, "consensus": 1.0, "border": -1.0},
        ),
        RoiPolicy(
            name="dark-blob",
            summary="whole image + 4 dark blobs x 3 box sizes, every mask output, ranked by a linear score fitted "
            "on the BUSI tune half, one refinement of the best mask",
            blob_polarity="dark",
            blob_count=4,
            blob_sigma_scales=(2.5,),
            blob_half_sides=(0.1, 0.28),
            mask_outputs="all",
            refine_steps=1,
            # policy_fit.fit_weights on 160 of the 323 lesion images of the tune half (split_tune_report, seed 0);
            # 5-fold CV Dice there 0.656. Report-half numbers: benchmarks/README.md.
            weights={
                "iou": 1.511, "stability": -0.9933, "log_area": 0.62, "log_area_sq": -0.01896, "border": -14.65,
                "darkness": 1.223, "inside_offset": -7.398, "inside_std": 11.3, "edge": 1.784, "fill": 1.362,
                "consensus": 12.85, "support": -7.204, "centre_y": -4.064, "centre_x_offset": -3.62,
                "box_touch": -0.521, "seed_rank": -0.0461, "whole": -0.9126,
            },
        ),
        RoiPolicy(
            name="demo-lesion",
            summary="whole image + 4 dark blobs at the demo lesions' scale x 2 box sizes, every mask output, ranked by "
            "a linear score fitted on the demo's tune half, one refinement of the best mask",
            blob_polarity="dark",
            blob_count=4,
            blob_scales=(0.05,),
            blob_surround=3.0,
            blob_sigma_scales=(2.0, 3.0),
            mask_outputs="all",
            refine_steps=1,
            min_area=0.005,
            max_area=0.2,
            # policy_fit.fit_weights on demo images 0-19 of each class (generator v3, LiteMedSAM); 5-fold CV Dice there
            # 0.899, Dice 0.842 on images 20-39 (oracle 0.894). benchmarks/README.md: demo ROI.
            weights={
                "iou": 0.3219, "stability": 0.6284, "log_area": -0.4624, "log_area_sq": 0.05117, "border": -9.734,
                "darkness": 0.9083, "inside_offset": -6.358, "inside_std": -3.574, "edge": 1.294, "fill": -2.892,
                "consensus": 4.099, "support": 0.2228, "centre_y": -0.558, "centre_x_offset": -1.404,
                "box_touch": 1.349, "seed_rank": -0.3305,
            },
        ),
    )
}


DEFAULT_POLICY_BY_DATASET: dict[str, str] = {
    # The demo's hypoechoic lesions among hyperechoic distractors (pipeline/demo.py).
    "demo": "demo-lesion",
    # Hypoechoic lesions: dark-blob proposals, lesion Dice 0.632 on the BUSI report half (registered name, and the
    # shared folder's name for ad-hoc use).
    "breast_cancer": "dark-blob",
    "breast_ultrasound": "dark-blob",
}
# Datasets without ground-truth masks to measure a policy on.
GENERIC_DEFAULT_POLICY = "grid-score"


def get_policy(name: str) -> RoiPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown ROI policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def default_policy_for(dataset: str) -> str:
    """The measured-best policy for a dataset, or the generic one where no ground truth exists to measure."""
    return DEFAULT_POLICY_BY_DATASET.get(dataset, GENERIC_DEFAULT_POLICY)
