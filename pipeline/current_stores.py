"""Which store is current: one rule for every stage. Resolve today's spec (pipeline.specs), take its key, open that.

No summary file and no comparison of settings decides it; a store made with other settings, weights or code has
another key and is simply not the one looked up.
"""

from __future__ import annotations

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.specs import (
    LITEMEDSAM,
    MODES_WITHOUT_MASKS,
    EncoderSpec,
    FeatureStoreSpec,
    FeaturesSpec,
    SegmentSpec,
    resolve_encoder,
    resolve_features,
    resolve_segment,
)
from medfocus.pipeline.store import FeatureStore, MaskStore, StoreMissingError

from .common import PreparedDataset, load_prepared


class TextOutdatedError(StoreMissingError):
    """The feature store's text embeddings were made from other prompts than today's."""


def mask_store_url(paths: DatasetPaths, spec: SegmentSpec, params: Params) -> str:
    return paths.store_url("masks", spec.key, params.segment.store_root)


def current_mask_store(dataset: DatasetSpec, params: Params, paths: DatasetPaths, spec: SegmentSpec | None = None) -> MaskStore:
    """The mask store today's segment settings call for (one rule: the key of the resolved spec), or a clear error."""
    spec = spec or resolve_segment(params.segment, dataset.name)
    return MaskStore.lookup(mask_store_url(paths, spec, params), spec.key, dataset.name)


def resolve_features_for(dataset: DatasetSpec, params: Params, prepared: PreparedDataset, modes: list[str],
                         encoder: EncoderSpec | None = None) -> FeaturesSpec:
    """The feature stores today's settings call for. The segment spec is resolved only where it matters: for modes
    that use masks, and for LiteMedSAM, whose whole-image features come from the mask store's embedding."""
    encoder = encoder or resolve_encoder(params.features)
    needs_masks = any(mode not in MODES_WITHOUT_MASKS for mode in modes)
    segment = resolve_segment(params.segment, dataset.name) if needs_masks or encoder.family == LITEMEDSAM else None
    return resolve_features(params.features, modes, segment, prepared.class_names, prepared.prompts, encoder)


def feature_store_url(paths: DatasetPaths, store: FeatureStoreSpec, params: Params) -> str:
    return paths.store_url("features", store.key, params.features.store_root)


def current_feature_store(dataset: DatasetSpec, params: Params, paths: DatasetPaths, mode: str,
                          prepared: PreparedDataset | None = None) -> FeatureStore:
    """The feature store today's settings call for in ``mode`` (one rule: the key of the resolved spec), or a clear error."""
    prepared = prepared or load_prepared(dataset, params, paths, progress=False)
    spec = resolve_features_for(dataset, params, prepared, [mode])
    store_spec = spec.stores[mode]
    store = FeatureStore.lookup(feature_store_url(paths, store_spec, params), store_spec.key, dataset.name, mode)
    if not store.text_matches(spec.text):
        raise TextOutdatedError(f"the {mode!r} features of {dataset.name!r} hold text embeddings of other prompts: run "
                                f"`medfocus features --dataset {dataset.name} --mode {mode}` to embed today's prompts")
    return store


