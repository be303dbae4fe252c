"""The features stage: images (+ their ROI from the mask store) through a frozen encoder once, into Zarr.

One store per ROI steering mode, at ``cache/<dataset>/features/<key>.zarr``; the key hashes the store's spec
(pipeline.specs: the encoder and its resolved weights sha256, the mode and its parameters, the mask store's key where
masks or the stored embedding are used, the dtype, the code that computes features). Per image: ``global`` (D),
``patches`` (L × D), ``roi_weights`` (L), and in mode ``dual`` also ``roi_global`` (D, the ROI view: the encoder's
tokens pooled over the ROI). Once per store: the text embedding of every class prompt (``shared/text``) for encoders
with a text tower, rewritten whenever the prompts change.

With LiteMedSAM (the offline default) the modes ``none`` and ``dual`` cost no encoder pass: the segment stage stored
each image's embedding with its masks, and this stage copies it. Other modes and encoders encode here; the encoder is
built in each worker from the driver's resolved spec (no second hub look-up) and checked against it.

Outputs: ``features.json`` (content only: what each store holds; DVC's dependency of later stages) and
``features.run.json`` (how the run went).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from medfocus.pipeline.config import Params
from medfocus.pipeline.current_stores import current_mask_store, feature_store_url, resolve_features_for
from medfocus.pipeline.datasets import DatasetSpec
from medfocus.pipeline.encoders import (
    UnsupportedEncoderFeature,
)
from medfocus.pipeline.encoders.weights import HOW_TO_PROVIDE_WEIGHTS
from medfocus.pipeline.external import external_content, external_work_items, load_externals
from medfocus.pipeline.feature_bank import bank_identity, bank_weights_source
from medfocus.pipeline.featurize import encode_batch, encoder_input, from_mask_store, shared_encoder
from medfocus.pipeline.manifest import write_json
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.preparation import load_manifest_image, load_prepared
from medfocus.pipeline.provenance import RANDOM_INIT, package_versions
from medfocus.pipeline.runner import Outcome, WorkItem, run_incremental
from medfocus.pipeline.specs import EncoderSpec, FeaturesSpec
from medfocus.pipeline.stage_outputs import done_digest, run_file
from medfocus.pipeline.store import FeatureStore, MaskStore
from medfocus.pipeline.worker_models import check_same_model, set_torch_threads

log = logging.getLogger(__name__)


def _features_chunk(items: list[WorkItem], context: dict) -> list[Outcome]:
    set_torch_threads(context["workers"])
    store = FeatureStore(context["store_url"])
    masks = MaskStore(context["mask_store_url"], read_only=True) if context["mask_store_url"] else None
    mode, params, dtype = context["mode"], context["params"], np.dtype(context["dtype"])
    if context["from_mask_store"]:
        outcomes = []
        for item in items:
            try:
                store.write_features(item.hash, from_mask_store(masks.read_embedding(item.hash), mode), dtype)
                outcomes.append(Outcome(item.hash, item.path, True))
            except Exception as error:  # this image fails, with its reason; the rest go on
                outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
        return outcomes
    try:
        encoder = shared_encoder(context["build"])
        check_same_model({"weights_sha256": encoder.describe()["weights_sha256"]},
                         {"weights_sha256": context["weights_sha256"]}, "encoder")
    except Exception as error:  # a worker that cannot build the driver's encoder fails its images, with the reason
        return [Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}") for item in items]
    outcomes: list[Outcome] = []
    # Zarr writes mostly wait on storage: one writer thread stores batch n while batch n + 1 is read and encoded.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for start in range(0, len(items), context["batch_size"]):
            batch_items, images, rois, labels = [], [], [], []
            for item in items[start : start + context["batch_size"]]:
                try:
                    image = encoder_input(load_manifest_image(item), context["intensity"])
                    roi, label = masks.read_masks(item.hash) if masks is not None else (None, None)
                except Exception as error:  # this image fails; the batch goes on
                    outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
                    continue
                images.append(image)
                rois.append(roi)
                labels.append(label)
                batch_items.append(item)
            if not batch_items:
                continue
            try:
                rows = encode_batch(encoder, images, rois, labels, mode, params)
            except Exception as error:
                outcomes.extend(Outcome(i.hash, i.path, False, f"{type(error).__name__}: {error}") for i in batch_items)
                continue
            if pending is not None:
                outcomes.extend(pending.result())
            pending = writer.submit(_write_batch, store, batch_items, rows, dtype)
        if pending is not None:
            outcomes.extend(pending.result())
    return outcomes


def _write_batch(store: FeatureStore, items: list[WorkItem], rows: list[dict[str, np.ndarray]],
                 dtype: np.dtype) -> list[Outcome]:
    """Store each encoded image (its completion flag last); an image whose write fails is reported, the rest go on."""
    outcomes = []
    for item, arrays in zip(items, rows):
        try:
            store.write_features(item.hash, arrays, dtype)
            outcomes.append(Outcome(item.hash, item.path, True))
        except Exception as error:
            outcomes.append(Outcome(item.hash, item.path, False, f"{type(error).__name__}: {error}"))
    return outcomes


def write_text_embeddings(store: FeatureStore, spec: FeaturesSpec) -> None:
    """Every prompt of every class, embedded once per store and again whenever the prompts change."""
    if spec.text is None or store.text_matches(spec.text):
        return
    prompts, classes = [], []
    for class_index, name in enumerate(spec.text["class_names"]):
        for prompt in spec.text["prompts"][name]:
            prompts.append(prompt)
            classes.append(class_index)
    encoder = shared_encoder(spec.encoder.build)
    with torch.inference_mode():
        embeddings = encoder.encode_text(prompts).float().numpy()
    store.write_text(spec.text, embeddings, classes, prompts)


def _warn_random_init(encoder: EncoderSpec) -> None:
    reason = encoder.build.get("weights_plan", {}).get("unavailable_reason")
    cause = f"its pretrained weights could not be had ({reason})" if reason else "it was asked for without weights"
    log.warning(
        "\n%s\nRANDOM-INIT ENCODER: %s is randomly initialised: %s. Every feature store and result made from it is "
        "marked random-init and is NOT a real result.%s\n%s",
        "!" * 100, encoder.identity["model"], cause, f"\n{HOW_TO_PROVIDE_WEIGHTS}" if reason else "", "!" * 100,
    )


def _encoder_stores(dataset: DatasetSpec, params: Params, paths: DatasetPaths, prepared, spec: FeaturesSpec, externals,
                    progress: bool) -> tuple[dict, dict]:
    """Make what is missing in each mode's store of one encoder; (content, run) per mode."""
    settings = params.features
    encoder = spec.encoder
    content_modes, run_modes = {}, {}
    for mode, store_spec in spec.stores.items():
        mask_store = current_mask_store(dataset, params, paths, spec.segment) if store_spec.mask_store_key else None
        store = FeatureStore.create(feature_store_url(paths, store_spec, params), store_spec.key, store_spec.content,
                                    {"versions": package_versions(), "weights_source": encoder.weights_source,
                                     "mask_store_url": mask_store.url if mask_store else None})
        write_text_embeddings(store, spec)
        run = run_incremental(
            prepared.work_items() + external_work_items(prepared, externals),
            store.done,
            _features_chunk,
            {"build": encoder.build, "weights_sha256": encoder.identity["weights_sha256"], "store_url": store.url,
             "mask_store_url": mask_store.url if mask_store else None, "mode": mode,
             "from_mask_store": store_spec.from_mask_store_embedding, "params": store_spec.content["steering"],
             "intensity": store_spec.content["intensity"],
             "dtype": settings.dtype, "batch_size": settings.batch_size, "workers": settings.workers},
            scheduler=settings.scheduler,
            workers=settings.workers,
            chunk_size=settings.chunk_size,
            description=f"features {dataset.name} [{encoder.identity['model']}, {mode}]",
            progress=progress,
        )
        for failure in run.failed:
            log.warning("feature extraction (%s, %s) failed for %s: %s", encoder.identity["model"], mode, failure["path"],
                        failure["reason"])
        done = store.done([entry.hash for entry in prepared.entries])
        failed = [f | {"mode": mode} for f in run.failed + prepared.unreadable()]
        content_modes[mode] = {"store_key": store_spec.key, "steering": store_spec.content["steering"],
                               "mask_store_key": store_spec.mask_store_key,
                               "embedding_source": store_spec.content["embedding_source"], "done": len(done),
                               "done_digest": done_digest(done), "failed": failed}
        if externals:
            content_modes[mode]["external"] = external_content(externals, store.done)
        counts = run.to_dict()
        run_modes[mode] = {key: counts[key] for key in ("processed", "skipped", "seconds", "images_per_s")} | {"store": store.url}
    return content_modes, run_modes


def features(dataset: DatasetSpec, params: Params, paths: DatasetPaths, modes: list[str] | None = None,
             progress: bool = True) -> dict:
    """Make what is missing in each mode's store (of each encoder of a bank); write ``features.json`` and
    ``features.run.json``; return both merged.

    The encoder's weights are resolved once, here; workers rebuild the same encoder from that resolution.
    """
    settings = params.features
    modes = list(modes or settings.modes)
    prepared = load_prepared(dataset, params, paths, progress=progress)
    spec = resolve_features_for(dataset, params, prepared, modes, paths)
    encoders = [member.encoder for member in spec.encoders]
    for encoder in encoders:
        if encoder.note:
            log.info("%s", encoder.note)
    without_attention = [encoder for encoder in encoders if not encoder.steers_attention]
    if "attention" in modes and without_attention:
        raise UnsupportedEncoderFeature(
            f"mode 'attention' biases the attention inside a ViT, and {without_attention[0].identity['model']} has none to "
            "bias: use the modes none, dual, overlay, blur or crop with it"
        )
    for encoder in encoders:
        if encoder.random_init:
            _warn_random_init(encoder)
    # External test sets (pipeline.external): encoded into the same stores with the same encoder and ROI steering.
    externals = load_externals(dataset, params, paths, prepared)
    made = [_encoder_stores(dataset, params, paths, prepared, member, externals, progress) for member in spec.encoders]
    content_modes, run_modes = made[0]
    random_init = any(encoder.random_init for encoder in encoders)
    content = {
        "stage": "features",
        "dataset": dataset.name,
        "encoder": bank_identity([e.identity for e in encoders]) if spec.bank else spec.encoder.identity,
        "encoder_choice": spec.encoder.note or f"features.model {settings.model}",
        "weights_source": bank_weights_source([e.weights_source for e in encoders]) if spec.bank else spec.encoder.weights_source,
        "random_init": random_init,
        "text": None if spec.bank else spec.text,
        "total": len(prepared.entries) + len(prepared.unreadable()),
        "modes": content_modes,
        "failed": [f for m in content_modes.values() for f in m["failed"]],
    }
    if spec.bank:
        # What each encoder's stores hold; the bank uses the images every encoder has (pipeline.feature_bank).
        content["bank"] = [{"encoder": member.encoder.identity, "modes": member_modes}
                           for member, (member_modes, _) in zip(spec.encoders, made)]
        content["failed"] = [f | {"encoder": member.encoder.identity["model"]}
                             for member, (member_modes, _) in zip(spec.encoders, made)
                             for m in member_modes.values() for f in m["failed"]]
    content["failed_count"] = len(content["failed"])
    if random_init:
        content["warning"] = f"{RANDOM_INIT}: features come from an encoder without pretrained weights; results are not real"
    write_json(paths.features_summary, content)
    all_runs = [mode_run for _, member_runs in made for mode_run in member_runs.values()]
    seconds = sum(m["seconds"] for m in all_runs)
    processed = sum(m["processed"] for m in all_runs)
    run_summary = {"processed": processed, "skipped": sum(m["skipped"] for m in all_runs),
                   "seconds": round(seconds, 3), "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
                   "scheduler": settings.scheduler, "workers": settings.workers, "modes": run_modes,
                   "versions": package_versions()}
    if spec.bank:
        run_summary["bank_runs"] = [{"encoder": member.encoder.identity["model"], "modes": member_runs}
                               for member, (_, member_runs) in zip(spec.encoders, made)]
    write_json(run_file(paths.features_summary), run_summary)
    merged_modes = {mode: content_modes[mode] | run_modes[mode] for mode in content_modes}
    return content | run_summary | {"modes": merged_modes}
