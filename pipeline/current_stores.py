"""Which store is current: one rule for every stage. Today's spec (pipeline.specs), its key, the store of that key.

No summary file and no comparison of settings decides it; a store made with other settings, weights or code has
another key and is simply not the one looked up.

The spec has one owner: ``medfocus resolve`` (the resolve stage, run first by every ``dvc repro``) resolves it,
``auto`` included, and writes ``segment.spec.json`` / ``features.spec.json``. Every other stage reads those files
(no second hub look-up, no second hashing of weights) when they were resolved from today's settings and code. When
they were not: under DVC that is an error naming ``medfocus resolve``; run by hand, the stage resolves and writes
them itself, with the same code.
"""

from __future__ import annotations

import os

from medfocus.pipeline.config import Params
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.feature_bank import FeatureBank
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import PreparedDataset, load_prepared
from medfocus.pipeline.specs import (
    FEATURES_CODE,
    LITEMEDSAM,
    MODES_WITHOUT_MASKS,
    SEGMENT_CODE,
    EncoderSpec,
    FeaturesSpec,
    FeatureStoreSpec,
    SegmentSpec,
    code_fingerprint,
    needs_segment,
    resolve_encoders,
    resolve_features,
    resolve_segment,
)
from medfocus.pipeline.store import FeatureStore, MaskStore, StoreMissingError, store_key


class TextOutdatedError(StoreMissingError):
    """The feature store's text embeddings were made from other prompts than today's."""


class SpecOutdatedError(ValueError):
    """Under DVC, a spec file resolved from other settings or code than today's (``medfocus resolve`` did not run)."""


# Settings that change how fast a result comes, not what it is: in no spec, and not in what a spec was resolved from.
EXECUTION_SETTINGS = {"device", "scheduler", "workers", "chunk_size", "batch_size", "store_root"}


def _settings(section) -> dict:
    return section.model_dump(mode="json", exclude=EXECUTION_SETTINGS & set(type(section).model_fields))


def _resolved_from(dataset: DatasetSpec, params: Params, prepared: PreparedDataset | None = None) -> dict[str, str]:
    """What each spec file was resolved from (its settings, the dataset; for features also classes and prompts; a policy
    file's content, so that a refitted file at the same path is resolved again)."""
    from medfocus.pipeline.segmenters.policies import policy_content_hash

    policy_file = policy_content_hash(params.segment.policy)
    segment = store_key({"dataset": dataset.name, "segment": _settings(params.segment),
                         **({"policy_file": policy_file} if policy_file else {})})
    features = store_key({"segment": segment, "features": _settings(params.features),
                          "classes": prepared.prompts if prepared is not None else None})
    return {"segment": segment, "features": features}


def _without_device(build: dict) -> dict:
    return {key: value for key, value in build.items() if key != "device"}


def write_specs(paths: DatasetPaths, resolved_from: dict[str, str], segment: SegmentSpec, features: FeaturesSpec) -> None:
    """The spec files: the content specs (DVC's dependency of segment and features) and what builds their models."""
    write_json(paths.segment_spec, {"key": segment.key, "spec": segment.content, "build": _without_device(segment.build_options),
                                    "resolved_from": resolved_from["segment"]})
    bank_builds = {"bank_build": [_without_device(member.encoder.build) for member in features.bank]} if features.bank else {}
    write_json(paths.features_spec, features.content() | {"build": _without_device(features.encoder.build),
                                                          "encoder_note": features.encoder.note,
                                                          "resolved_from": resolved_from["features"]} | bank_builds)


def resolve_specs(dataset: DatasetSpec, params: Params, paths: DatasetPaths, prepared: PreparedDataset) -> tuple[SegmentSpec, FeaturesSpec]:
    """Resolve today's specs (``auto`` included) and write the spec files: the resolve stage's work."""
    segment = resolve_segment(params.segment, dataset.name)
    features = resolve_features(params.features, list(params.features.modes), segment, prepared.class_names,
                                prepared.prompts)
    write_specs(paths, _resolved_from(dataset, params, prepared), segment, features)
    return segment, features


def _under_dvc() -> bool:
    return bool(os.environ.get("DVC_STAGE"))


def _outdated(path, why: str, dataset: DatasetSpec) -> None:
    """Under DVC a stale spec file is an error; by hand the caller resolves it again."""
    if _under_dvc():
        raise SpecOutdatedError(f"{path} {why}: run `medfocus resolve --dataset {dataset.name}` (dvc repro runs it "
                                "first; a stage run on its own must not resolve the spec a second way)")


def _recorded(path, resolved_from: str, code_files: tuple[str, ...], dataset: DatasetSpec) -> dict | None:
    """The spec file when it was resolved from today's settings and code; None (by hand) or an error (DVC) if not."""
    if not path.exists():
        _outdated(path, "does not exist", dataset)
        return None
    recorded = read_json(path)
    spec = recorded.get("spec") or next(iter(recorded.get("stores", {}).values()), {}).get("spec", {})
    if recorded.get("resolved_from") != resolved_from:
        _outdated(path, "was resolved from other settings than today's", dataset)
        return None
    if spec.get("code") != code_fingerprint(code_files):
        _outdated(path, "was resolved from other code than today's", dataset)
        return None
    return recorded


def current_segment_spec(dataset: DatasetSpec, params: Params, paths: DatasetPaths) -> SegmentSpec:
    """Today's segment spec: the one ``medfocus resolve`` wrote (see the module's docstring)."""
    recorded = _recorded(paths.segment_spec, _resolved_from(dataset, params)["segment"], SEGMENT_CODE, dataset)
    if recorded is None:
        return resolve_segment(params.segment, dataset.name)
    return SegmentSpec(recorded["spec"], recorded["build"] | {"device": params.segment.device})


def _features_from_file(recorded: dict, params: Params, modes: list[str], segment: SegmentSpec | None) -> FeaturesSpec:
    encoder = EncoderSpec(recorded["encoder"], recorded["build"] | {"device": params.features.device},
                          note=recorded.get("encoder_note", ""))
    stores = {mode: FeatureStoreSpec(mode, recorded["stores"][mode]["spec"], recorded["stores"][mode]["spec"]["mask_store"],
                                     recorded["stores"][mode]["spec"]["embedding_source"] == "mask store")
              for mode in modes}
    bank = tuple(_features_from_file(member | {"build": build}, params, modes, segment)
                 for member, build in zip(recorded.get("bank", []), recorded.get("bank_build", [])))
    return FeaturesSpec(encoder, stores, recorded["text"], segment, bank)


def mask_store_url(paths: DatasetPaths, spec: SegmentSpec, params: Params) -> str:
    return paths.store_url("masks", spec.key, params.segment.store_root)


def current_mask_store(dataset: DatasetSpec, params: Params, paths: DatasetPaths, spec: SegmentSpec | None = None) -> MaskStore:
    """The mask store today's segment settings call for (one rule: the key of the resolved spec), or a clear error."""
    spec = spec or current_segment_spec(dataset, params, paths)
    return MaskStore.lookup(mask_store_url(paths, spec, params), spec.key, dataset.name)


def resolve_features_for(dataset: DatasetSpec, params: Params, prepared: PreparedDataset, modes: list[str],
                         paths: DatasetPaths) -> FeaturesSpec:
    """The feature stores today's settings call for in ``modes``: from the spec file ``medfocus resolve`` wrote (see
    the module's docstring). The segment spec comes along where it matters: for modes that use masks, and for
    LiteMedSAM, whose whole-image features come from the mask store's embedding."""
    resolved_from = _resolved_from(dataset, params, prepared)["features"]
    recorded = _recorded(paths.features_spec, resolved_from, FEATURES_CODE, dataset)
    if recorded is not None and set(modes) <= set(recorded["stores"]):
        families = [recorded["encoder"]["family"]] + [member["encoder"]["family"] for member in recorded.get("bank", [])]
        needs_masks = any(mode not in MODES_WITHOUT_MASKS for mode in modes)
        segment = current_segment_spec(dataset, params, paths) if needs_masks or LITEMEDSAM in families else None
        return _features_from_file(recorded, params, modes, segment)
    encoders = resolve_encoders(params.features)
    segment = current_segment_spec(dataset, params, paths) if needs_segment(params.features, encoders, modes) else None
    return resolve_features(params.features, modes, segment, prepared.class_names, prepared.prompts, encoders)


def feature_store_url(paths: DatasetPaths, store: FeatureStoreSpec, params: Params) -> str:
    return paths.store_url("features", store.key, params.features.store_root)


def current_feature_store(dataset: DatasetSpec, params: Params, paths: DatasetPaths, mode: str,
                          prepared: PreparedDataset | None = None) -> FeatureStore | FeatureBank:
    """The feature store today's settings call for in ``mode`` (one rule: the key of the resolved spec), or a clear
    error; for an encoder bank, its encoders' stores read as one (pipeline.feature_bank)."""
    prepared = prepared or load_prepared(dataset, params, paths, progress=False)
    spec = resolve_features_for(dataset, params, prepared, [mode], paths)
    stores = []
    for member in spec.encoders:
        store_spec = member.stores[mode]
        store = FeatureStore.lookup(feature_store_url(paths, store_spec, params), store_spec.key, dataset.name, mode)
        if not store.text_matches(member.text):
            raise TextOutdatedError(f"the {mode!r} features of {dataset.name!r} hold text embeddings of other prompts: run "
                                    f"`medfocus features --dataset {dataset.name} --mode {mode}` to embed today's prompts")
        stores.append(store)
    return FeatureBank(stores) if spec.bank else stores[0]


