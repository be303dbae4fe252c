"""ROI policies as data: which box prompts to try and how to score the masks they give (:mod:`.selection` runs them).

A policy is a *policy file* (JSON, :class:`PolicyFile`, versioned, validated: an unknown key, an unknown proposal
kind or a bad value is refused with the key named). The built-in policies are such files shipped in
``builtin_policies/`` beside this module and loaded by name (:data:`POLICIES`); ``medfocus roi-fit`` writes new ones
(:mod:`.policy_fit`). ``segment.policy`` names a built-in policy, ``auto`` (:data:`DEFAULT_POLICY_BY_DATASET`) or the
path of a policy file; a relative path is read from the working directory. What the mask store's key hashes is the
policy as data (:meth:`RoiPolicy.describe`), never the path, so moving or reformatting a file changes nothing and a
refitted one reruns segmentation.

This module imports no torch: the resolve stage, run on every ``dvc repro``, describes the policy in the mask store's spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    "from_map",  # 1 if prompted by an embedding-map box (pipeline/segmenters/embedding_map.py)
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
    blob_foreground_erosion: float | None = None  # blob centres only inside the foreground eroded by this share of the side
    mask_outputs: str = "single"
    refine_steps: int = 0
    refine_top: int = 1
    refine_margin: float = 0.15
    weights: Mapping[str, float] = field(default_factory=lambda: {"iou": 1.0})
    min_area: float = 0.002
    max_area: float = 0.9
    decode_batch: int = 1  # prompts per decoder call; one at a time is fastest on CPU
    # The embedding map (pipeline/segmenters/embedding_map.py): no thresholds, no map proposals; no weights, not fitted yet.
    map_thresholds: tuple[float, ...] = ()
    map_weights: tuple[float, ...] = ()
    map_bias: float = 0.0
    map_segmenter_sha256: str | None = None  # the segmenter weights whose embedding the scorer was fitted on

    def __post_init__(self) -> None:
        if self.mask_outputs not in MASK_OUTPUTS:
            raise ValueError(f"mask_outputs must be one of {sorted(MASK_OUTPUTS)}, got {self.mask_outputs!r}")
        unknown = set(self.weights) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown feature(s) {sorted(unknown)} in weights; known: {FEATURE_NAMES}")

    @property
    def has_map(self) -> bool:
        return bool(self.map_thresholds)

    def describe(self) -> dict:
        description = dataclasses.asdict(self)
        description["weights"] = dict(sorted(self.weights.items()))
        for name in ("grid_scales", "blob_sigma_scales", "blob_half_sides", "blob_scales", "map_thresholds", "map_weights"):
            description[name] = list(description[name])
        if description["blob_foreground_erosion"] is None:  # policies without it describe themselves as before
            del description["blob_foreground_erosion"]
        if not self.has_map:  # likewise policies without an embedding map
            for name in ("map_thresholds", "map_weights", "map_bias", "map_segmenter_sha256"):
                del description[name]
        return description

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> RoiPolicy:
        """The policy :meth:`describe` described (what a mask store's spec and a segmenter's build options hold)."""
        values = dict(description)
        for name in ("grid_scales", "blob_sigma_scales", "blob_half_sides", "blob_scales", "map_thresholds", "map_weights"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


# --- the policy file ---------------------------------------------------------------------------------------------------

POLICY_FILE_FORMAT = "medfocus-roi-policy"
POLICY_FILE_VERSION = 1


class PolicyFileError(ValueError):
    """A policy file that cannot be used: the message (one line) names the file and the key."""


class RoiInputError(ValueError):
    """Ground truth, a split rule or data that ``roi-eval`` / ``roi-fit`` cannot use: the message says which and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WholeImageProposal(_Strict):
    """One box prompt covering the whole image."""

    kind: Literal["whole-image"]


class CentreProposal(_Strict):
    """One central square box prompt; ``side`` is its side as a fraction of the image's."""

    kind: Literal["centre"]
    side: float = Field(gt=0.0, le=1.0)


class GridProposal(_Strict):
    """Square boxes of each side in ``scales`` (fractions), centres on a ``steps`` x ``steps`` grid."""

    kind: Literal["grid"]
    scales: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(min_length=1)
    steps: int = Field(default=3, ge=1)


class BlobProposal(_Strict):
    """Boxes around the ``count`` strongest blobs darker (or brighter) than their surroundings (selection.find_blobs):
    half-sides ``sigma_scales`` x the blob's scale, and ``half_sides`` as fixed fractions of the image side."""

    kind: Literal["blobs"]
    polarity: Literal["dark", "bright"]
    count: int = Field(ge=1)
    sigma_scales: list[Annotated[float, Field(gt=0.0)]] = Field(default=[2.5])
    half_sides: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=list)
    detector_scales: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default=list(BLOB_SCALES), min_length=1)
    surround: float = Field(default=BLOB_SURROUND, gt=1.0)
    foreground_erosion: float | None = Field(
        default=None, ge=0.0, lt=0.5,
        description="Blob centres only inside the image's foreground eroded by this share of the side (brain MRI: the "
                    "head without skull and scalp); unset: anywhere.")


class EmbeddingMapProposal(_Strict):
    """Boxes around the lesion a linear scorer over the cells of the segmenter's own image embedding finds
    (pipeline/segmenters/embedding_map.py): per threshold, the cells connected to the best-scoring one whose probability
    is at least that share of the best. ``weights``, ``bias`` and ``segmenter_sha256`` are what ``medfocus roi-fit``
    fits (left out in a start policy); a policy that segments needs them."""

    kind: Literal["embedding-map"]
    thresholds: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default=[0.3, 0.5], min_length=1)
    weights: list[float] | None = Field(default=None, min_length=1)
    bias: float | None = None
    segmenter_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _fitted_together(self) -> EmbeddingMapProposal:
        given = [name for name in ("weights", "bias", "segmenter_sha256") if getattr(self, name) is not None]
        if given and len(given) < 3:
            raise ValueError(f"an embedding map's weights, bias and segmenter_sha256 come together (roi-fit writes them); "
                             f"this one has only {', '.join(given)}")
        return self


Proposal = Annotated[Union[WholeImageProposal, CentreProposal, GridProposal, BlobProposal, EmbeddingMapProposal],
                     Field(discriminator="kind")]
PROPOSAL_KINDS = ("whole-image", "centre", "grid", "blobs", "embedding-map")


class Decoding(_Strict):
    mask_outputs: Literal["single", "multi", "all"] = Field(default="single", description="SAM's single-mask output, its three multimask outputs, or all four.")
    batch: int = Field(default=1, ge=1, description="Prompts per decoder call (speed only).")


class Refinement(_Strict):
    steps: int = Field(default=0, ge=0, description="Rounds of re-prompting the best masks with their own bounding box.")
    top: int = Field(default=1, ge=1, description="How many of the best masks are re-prompted each round.")
    margin: float = Field(default=0.15, ge=0.0, description="Growth of that box on every side, as a fraction of its size.")


class Selection(_Strict):
    weights: dict[str, float] = Field(min_length=1, description="Linear score over the mask features (FEATURE_NAMES).")
    min_area: float = Field(default=0.002, ge=0.0, le=1.0)
    max_area: float = Field(default=0.9, gt=0.0, le=1.0)

    @field_validator("weights")
    @classmethod
    def _known_features(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(FEATURE_NAMES)}")
        return weights

    @model_validator(mode="after")
    def _area_range(self) -> Selection:
        if self.min_area >= self.max_area:
            raise ValueError(f"min_area {self.min_area} must be below max_area {self.max_area}")
        return self


class GroundTruthSource(_Strict):
    kind: Literal["masks", "yolo-boxes", "csv-boxes"]
    path: str
    mask_suffix: str | None = None


class FitSplit(_Strict):
    rule: str = Field(description="The held-out rule in words.")
    group_by: str
    holdout_fraction: float | None = None
    holdout_from: int | None = None
    seed: int = 0


class FitProvenance(_Strict):
    """Where and how a policy was fitted (``medfocus roi-fit``); not part of what decides the masks."""

    dataset: str
    images_root: str
    ground_truth: GroundTruthSource
    split: FitSplit
    counts: dict[str, int]
    started_from: str
    objective: str
    backend: str
    weights_sha256: str
    tune_cv_score: float | None = None
    date: str
    medfocus_version: str
    command: str | None = None


class HeldOutScores(_Strict):
    """The fitted policy measured once on the held-out images with a lesion (its choice simulated on their candidates)."""

    n: int
    box_iou: float
    hit_rate: float
    dice: float | None = None
    start_policy_box_iou: float | None = None
    start_policy_dice: float | None = None
    whole_image_box_iou: float
    no_lesion_images: int = 0


class PolicyFile(_Strict):
    """A policy file: what the ROI policy does (proposals, decoding, refinement, selection) and, for a fitted one,
    where and how it was fitted and its held-out scores."""

    format: Literal["medfocus-roi-policy"]
    version: int
    name: str = Field(min_length=1)
    summary: str = ""
    proposals: list[Proposal] = Field(min_length=1)
    decoding: Decoding = Field(default_factory=Decoding)
    refinement: Refinement = Field(default_factory=Refinement)
    selection: Selection
    fitted: FitProvenance | None = None
    held_out: HeldOutScores | None = None

    @field_validator("version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != POLICY_FILE_VERSION:
            raise ValueError(f"policy file version {version} is not one this medfocus reads (version {POLICY_FILE_VERSION})")
        return version

    @field_validator("proposals")
    @classmethod
    def _one_of_each_kind(cls, proposals: list) -> list:
        kinds = [proposal.kind for proposal in proposals]
        twice = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if twice:
            raise ValueError(f"proposal kind(s) {twice} listed more than once (list each kind once)")
        return proposals

    def to_policy(self) -> RoiPolicy:
        """The runtime policy (:class:`RoiPolicy`); absent proposal kinds leave their fields at the defaults."""
        values: dict[str, Any] = {"name": self.name, "summary": self.summary, "whole_box": False}
        for proposal in self.proposals:
            if proposal.kind == "whole-image":
                values["whole_box"] = True
            elif proposal.kind == "centre":
                values["center_side"] = proposal.side
            elif proposal.kind == "grid":
                values |= {"grid_scales": tuple(proposal.scales), "grid_steps": proposal.steps}
            elif proposal.kind == "embedding-map":
                values |= {"map_thresholds": tuple(proposal.thresholds), "map_weights": tuple(proposal.weights or ()),
                           "map_bias": proposal.bias or 0.0, "map_segmenter_sha256": proposal.segmenter_sha256}
            else:
                values |= {"blob_polarity": proposal.polarity, "blob_count": proposal.count,
                           "blob_sigma_scales": tuple(proposal.sigma_scales), "blob_half_sides": tuple(proposal.half_sides),
                           "blob_scales": tuple(proposal.detector_scales), "blob_surround": proposal.surround,
                           "blob_foreground_erosion": proposal.foreground_erosion}
        return RoiPolicy(**values, mask_outputs=self.decoding.mask_outputs, decode_batch=self.decoding.batch,
                         refine_steps=self.refinement.steps, refine_top=self.refinement.top,
                         refine_margin=self.refinement.margin, weights=dict(self.selection.weights),
                         min_area=self.selection.min_area, max_area=self.selection.max_area)

    def dump(self) -> str:
        """The file's text: indented JSON, unset provenance left out."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def policy_file_from(policy: RoiPolicy, fitted: FitProvenance | None = None,
                     held_out: HeldOutScores | None = None) -> PolicyFile:
    """The policy file of a runtime policy (``to_policy`` gives it back, ``describe()`` equal)."""
    proposals: list[dict] = []
    if policy.whole_box:
        proposals.append({"kind": "whole-image"})
    if policy.center_side:
        proposals.append({"kind": "centre", "side": policy.center_side})
    if policy.grid_scales:
        proposals.append({"kind": "grid", "scales": list(policy.grid_scales), "steps": policy.grid_steps})
    if policy.blob_polarity and policy.blob_count:
        proposals.append({"kind": "blobs", "polarity": policy.blob_polarity, "count": policy.blob_count,
                          "sigma_scales": list(policy.blob_sigma_scales), "half_sides": list(policy.blob_half_sides),
                          "detector_scales": list(policy.blob_scales), "surround": policy.blob_surround}
                         | ({"foreground_erosion": policy.blob_foreground_erosion}
                            if policy.blob_foreground_erosion is not None else {}))
    if policy.has_map:
        proposals.append({"kind": "embedding-map", "thresholds": list(policy.map_thresholds)}
                         | ({"weights": list(policy.map_weights), "bias": policy.map_bias,
                             "segmenter_sha256": policy.map_segmenter_sha256} if policy.map_weights else {}))
    return PolicyFile.model_validate({
        "format": POLICY_FILE_FORMAT, "version": POLICY_FILE_VERSION, "name": policy.name, "summary": policy.summary,
        "proposals": proposals, "decoding": {"mask_outputs": policy.mask_outputs, "batch": policy.decode_batch},
        "refinement": {"steps": policy.refine_steps, "top": policy.refine_top, "margin": policy.refine_margin},
        "selection": {"weights": dict(policy.weights), "min_area": policy.min_area, "max_area": policy.max_area},
        "fitted": fitted.model_dump() if fitted else None, "held_out": held_out.model_dump() if held_out else None,
    })


def _one_line(error: ValidationError) -> str:
    """Every problem of a policy file on one line, each with its key."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif item["type"] == "union_tag_invalid":
            problems.append(f"{key}: unknown proposal kind {item['input'].get('kind')!r} (known: {', '.join(PROPOSAL_KINDS)})")
        elif item["type"] == "union_tag_not_found":
            problems.append(f"{key}: a proposal needs a 'kind' ({', '.join(PROPOSAL_KINDS)})")
        else:
            problems.append(f"{key or 'file'}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_policy_file(text: str, source: str = "policy file") -> PolicyFile:
    """Validate a policy file's text; every problem is a :class:`PolicyFileError` naming ``source`` and the key."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise PolicyFileError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != POLICY_FILE_FORMAT:
        raise PolicyFileError(f"{source}: not a medfocus ROI policy file (its 'format' must be {POLICY_FILE_FORMAT!r}, "
                              f"got {raw.get('format')!r})")
    try:
        return PolicyFile.model_validate(raw)
    except ValidationError as error:
        raise PolicyFileError(f"{source}: {_one_line(error)}") from None


def read_policy_file(path: str | Path) -> PolicyFile:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyFileError(f"policy file {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    return parse_policy_file(text, str(path))


# --- the built-in policies: files shipped with the package ------------------------------------------------------------

BUILTIN_POLICY_DIR = Path(__file__).resolve().parent / "builtin_policies"


def _load_builtin() -> dict[str, RoiPolicy]:
    policies = {}
    for path in sorted(BUILTIN_POLICY_DIR.glob("*.json")):
        policy = read_policy_file(path).to_policy()
        if policy.name != path.stem:
            raise PolicyFileError(f"{path}: a built-in policy's name must be its file's name, got {policy.name!r}")
        policies[policy.name] = policy
    return policies


POLICIES: dict[str, RoiPolicy] = _load_builtin()
BUILTIN_POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


DEFAULT_POLICY_BY_DATASET: dict[str, str] = {
    # The demo's hypoechoic lesions among hyperechoic distractors (pipeline/demo.py).
    "demo": "demo-lesion",
    # Hypoechoic lesions: dark-blob proposals, lesion Dice 0.632 on the BUSI report half (registered name, and the
    # shared folder's name for ad-hoc use).
    "breast_cancer": "dark-blob",
    "breast_ultrasound": "dark-blob",
    # Brain MRI: bright blobs inside the head and a scorer over LiteMedSAM's embedding cells, box IoU 0.57 / Dice 0.58
    # on the held-out part of brain_tumor_boxes (brain-mri, blobs only: 0.38 / 0.41; whole-image box 0.02), 0.44 vs 0.39
    # on Br35H's tumour boxes (benchmarks/README.md: ROI quality).
    "brain_tumor": "brain-mri-map",
}
# Datasets without ground-truth masks to measure a policy on.
GENERIC_DEFAULT_POLICY = "grid-score"


def is_builtin(reference: str) -> bool:
    return reference in POLICIES


def check_policy_reference(value: str) -> str:
    """``segment.policy``'s check: ``auto``, a built-in name, or a readable, valid policy file (returned unchanged)."""
    if value == "auto" or is_builtin(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        names = ", ".join(repr(name) for name in ("auto", *BUILTIN_POLICY_NAMES))
        raise ValueError(f"unknown ROI policy {value!r}: give {names} or the path of a policy file "
                         f"(no file {path.resolve()}; a relative path is read from the working directory)")
    read_policy_file(path)
    return value


def get_policy(reference: str | Path | Mapping | RoiPolicy) -> RoiPolicy:
    """A policy from a built-in name, a policy file's path, a description (:meth:`RoiPolicy.describe`) or itself."""
    if isinstance(reference, RoiPolicy):
        return reference
    if isinstance(reference, Mapping):
        return RoiPolicy.from_description(reference)
    if str(reference) in POLICIES:
        return POLICIES[str(reference)]
    path = Path(reference).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown ROI policy {str(reference)!r}; choose one of {sorted(POLICIES)} or give a policy file")
    return read_policy_file(path).to_policy()


def policy_content_hash(reference: str) -> str | None:
    """sha256 of a policy file's policy as data (its :meth:`RoiPolicy.describe`); None for ``auto`` and built-in names."""
    if reference == "auto" or is_builtin(reference):
        return None
    canonical = json.dumps(get_policy(reference).describe(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_policy_for(dataset: str) -> str:
    """The measured-best policy for a dataset, or the generic one where no ground truth exists to measure."""
    return DEFAULT_POLICY_BY_DATASET.get(dataset, GENERIC_DEFAULT_POLICY)
