"""The trainer on synthetic cached features whose class signal sits only in the ROI patches (CPU, one thread)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from medfocus.trainer import (
    METHODS,
    ClassText,
    FeatureMismatchError,
    FeatureSet,
    FittedModel,
    MethodUnavailableError,
    ModelMismatchError,
    TrainConfig,
    ROI_VIEW_METHODS,
    aggregate,
    bootstrap_accuracy_ci,
    compute_metrics,
    contrastive_loss,
    fit,
    fusion_attention,
    medfocus_loss,
    plot_accuracy_vs_fraction,
    plot_attention_overlay,
    plot_confusion_matrix,
    stratified_folds,
    synthetic_task,
    validation_split,
    write_runs_csv,
)
from medfocus.trainer import methods
from medfocus.trainer.heads import FusionHead, HeadInputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = TrainConfig(epochs=40)


@pytest.fixture(scope="module")
def task():
    """60 training and 90 test images, 3 classes, D=32, L=16; only ROI patches (and the ROI view) carry the class."""
    pool, text = synthetic_task(150, num_classes=3, embed_dim=32, num_patches=16, roi_patches=3, signal=0.6, seed=0,
                                roi_view_signal=0.6)
    return pool.subset(range(60)), pool.subset(range(60, 150)), text


def accuracy(model: FittedModel, features: FeatureSet) -> float:
    return float((model.predict_proba(features).argmax(dim=1) == features.labels).float().mean())


# --- fitting ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits_and_predicts_probabilities(task, method):
    train, test, text = task
    model = fit(method, train, text, FAST, seed=0)
    proba = model.predict_proba(test)
    assert proba.shape == (len(test), 3) and proba.dtype == torch.float32
    assert torch.isfinite(proba).all() and (proba >= 0).all()
    assert torch.allclose(proba.sum(dim=1), torch.ones(len(test)), atol=1e-5)
    assert model.fit_info["method"] == method and model.fit_info["n_train"] == 60
    assert model.fit_info["hyperparameter_source"]


def test_medfocus_reads_the_roi_where_global_only_methods_cannot(task):
    train, test, text = task
    medfocus = accuracy(fit("medfocus", train, text, FAST, seed=0), test)
    clip_fewshot = accuracy(fit("clip_fewshot", train, text, FAST, seed=0), test)
    assert medfocus > 0.8, medfocus
    assert clip_fewshot < 0.55, clip_fewshot  # the global embedding is pure noise here
    assert medfocus > clip_fewshot + 0.3


def test_roi_bias_matters_when_only_roi_patches_carry_the_class(task):
    train, test, text = task
    without_roi = TrainConfig(epochs=40, roi_bias_strength=0.0, learn_roi_bias=False)
    blind = accuracy(fit("medfocus", train, text, without_roi, seed=0), test)
    steered = accuracy(fit("medfocus", train, text, FAST, seed=0), test)
    assert steered > blind, (steered, blind)


@pytest.mark.parametrize("lambda_", [0.0, 1.0])
def test_extreme_lambdas_train(task, lambda_):
    train, test, text = task
    model = fit("medfocus", train, text, TrainConfig(epochs=40, **{"lambda": lambda_}), seed=0)
    history = model.fit_info["loss_history"]
    assert history[-1] < 0.6 * history[0]
    assert accuracy(model, test) > 0.7
    components = model.fit_info["final_loss_components"]
    assert set(components) == {"contrastive", "cross_entropy"} and all(math.isfinite(v) for v in components.values())


def test_loss_components_follow_lambda():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 4, generator=generator) * 3
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    cross_entropy = F.cross_entropy(logits, labels)
    contrastive = contrastive_loss(logits, labels)
    assert torch.equal(medfocus_loss(logits, labels, 0.0)[0], cross_entropy)
    assert torch.equal(medfocus_loss(logits, labels, 1.0)[0], contrastive)
    assert torch.allclose(medfocus_loss(logits, labels, 0.3)[0], 0.3 * contrastive + 0.7 * cross_entropy)
    assert not torch.allclose(contrastive, cross_entropy)


def test_contrastive_loss_equals_clip_loss_with_repeated_classes_as_positives():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 4, generator=generator) * 2
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 1, 1, 2])  # class 3 absent from the batch
    # The explicit N×N CLIP matrix: image n against the class text of every image m in the batch.
    matrix = logits[:, labels]
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = -(targets * matrix.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets.T * matrix.T.log_softmax(dim=1)).sum(dim=1).mean()
    expected = 0.5 * (image_to_text + text_to_image)
    assert torch.allclose(contrastive_loss(logits, labels), expected, atol=1e-6)


def test_contrastive_loss_does_not_push_apart_images_of_one_class():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[5.0, -5.0], [5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0]])
    confused = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, 5.0]])
    # Perfect separation reaches the floor: each direction spreads its target over two equal positives, log(2).
    assert contrastive_loss(separated, labels) < contrastive_loss(confused, labels)
    assert math.isclose(float(contrastive_loss(separated, labels)), math.log(2), abs_tol=1e-3)


def test_minibatches_train_and_stay_deterministic(task):
    train, test, text = task
    config = TrainConfig(epochs=15, batch_size=16)
    first = fit("medfocus", train, text, config, seed=4).predict_proba(test)
    second = fit("medfocus", train, text, config, seed=4).predict_proba(test)
    assert torch.equal(first, second)
    assert float((first.argmax(dim=1) == test.labels).float().mean()) > 0.7


@pytest.mark.parametrize("method", ["medfocus", "clip_fewshot", "tip_adapter_f", "linear_probe"])
def test_same_seed_is_bit_identical(task, method):
    train, test, text = task
    first = fit(method, train, text, FAST, seed=7).predict_proba(test)
    second = fit(method, train, text, FAST, seed=7).predict_proba(test)
    assert torch.equal(first, second)


def test_same_seed_is_bit_identical_in_a_fresh_process(task, tmp_path):
    train, test, text = task
    here = fit("medfocus", train, text, FAST, seed=3).predict_proba(test)
    script = f"""
import torch
torch.set_num_threads(1)
from medfocus.trainer import TrainConfig, fit, synthetic_task
pool, text = synthetic_task(150, num_classes=3, embed_dim=32, num_patches=16, roi_patches=3, signal=0.6, seed=0)
model = fit("medfocus", pool.subset(range(60)), text, TrainConfig(epochs=40), seed=3)
torch.save(model.predict_proba(pool.subset(range(60, 150))), {str(tmp_path / "proba.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert torch.equal(torch.load(tmp_path / "proba.pt"), here)


def test_unknown_method_is_refused(task):
    train, _, text = task
    with pytest.raises(ValueError, match="choose one of zero_shot"):
        fit("tip", train, text, FAST, seed=0)


def test_another_seed_gives_other_numbers(task):
    train, test, text = task
    first = fit("medfocus", train, text, FAST, seed=7).predict_proba(test)
    other = fit("medfocus", train, text, FAST, seed=8).predict_proba(test)
    assert not torch.equal(first, other)


def test_baselines_choose_hyperparameters_on_validation_or_record_the_default(task):
    train, _, text = task
    probe = fit("linear_probe", train, text, FAST, seed=0)
    assert probe.fit_info["hyperparameter_source"] == "validation part of the training subset"
    assert probe.fit_info["n_val"] == 15 and probe.fit_info["hyperparameters"]["C"] in FAST.linear_probe_c_grid
    two_per_class = torch.cat([(train.labels == c).nonzero().flatten()[:2] for c in range(3)])
    tiny = train.subset(two_per_class)
    small = fit("tip_adapter", tiny, text, FAST, seed=0)
    assert small.fit_info["hyperparameters"] == {"alpha": 1.0, "beta": 5.5}
    assert small.fit_info["hyperparameter_source"].startswith("fixed defaults (subset too small")


def test_text_free_encoder(task):
    train, test, text = task
    no_text = ClassText(text.class_names, None)
    with pytest.raises(MethodUnavailableError, match="no text tower"):
        fit("zero_shot", train, no_text, FAST, seed=0)
    model = fit("medfocus", train, no_text, FAST, seed=0)
    assert model.fit_info["class_init"] == "prototypes"
    assert accuracy(model, test) > 0.7
    missing_class = train.subset((train.labels != 2).nonzero().flatten())
    with pytest.raises(MethodUnavailableError, match="class_2"):
        fit("clip_fewshot", missing_class, no_text, FAST, seed=0)


def _as_bank(features: FeatureSet, extra_dim: int, seed: int) -> FeatureSet:
    """``features`` as an encoder bank would give them: a second encoder's embedding (noise here) joined to the global
    embedding and the ROI view, each part normalised; the tokens stay the first encoder's (32-d)."""
    generator = torch.Generator().manual_seed(seed)

    def joined(first: Tensor) -> Tensor:
        return torch.cat([F.normalize(first, dim=-1), F.normalize(torch.randn(len(first), extra_dim, generator=generator), dim=-1)], dim=1)

    return FeatureSet(joined(features.global_emb), features.patch_tokens, features.roi_weights, features.labels, features.hashes,
                      roi_global=joined(features.roi_global) if features.roi_global is not None else None)


@pytest.mark.parametrize("method", ["medfocus", "medfocus_dual"])
def test_fusion_heads_take_tokens_narrower_than_an_encoder_banks_global_embedding(task, method, tmp_path):
    train, test, text = task
    bank_train, bank_test = _as_bank(train, 48, seed=1), _as_bank(test, 48, seed=2)
    no_text = ClassText(text.class_names, None)  # a bank has no text tower
    model = fit(method, bank_train, no_text, FAST, seed=0)
    assert (model.embed_dim, model.head.architecture["token_dim"]) == (80, 32)
    assert accuracy(model, bank_test) > 0.8  # the class is in the ROI tokens, which the bank keeps
    loaded = FittedModel.load(model.save(tmp_path / "bank.pt"))
    assert torch.equal(loaded.predict_proba(bank_test), model.predict_proba(bank_test))
    other_tokens = FeatureSet(bank_test.global_emb, bank_test.patch_tokens[:, :, :16], bank_test.roi_weights,
                              bank_test.labels, bank_test.hashes, roi_global=bank_test.roi_global)
    with pytest.raises(FeatureMismatchError, match="32-d patch tokens"):
        model.predict_proba(other_tokens)


# --- medfocus_dual: whole image and ROI view behind a gate ------------------------------------------------------


def _dual_task(seed: int, global_signal: float, roi_view_signal: float, patch_signal: float = 0.6):
    pool, text = synthetic_task(150, num_classes=3, embed_dim=32, num_patches=16, roi_patches=3, signal=patch_signal, seed=seed,
                                global_signal=global_signal, roi_view_signal=roi_view_signal)
    return pool.subset(range(60)), pool.subset(range(60, 150)), text


# The dual view's whole-image branch: the fusion head with the ROI bias fixed at 0 (medfocus in mode none).
WHOLE_IMAGE_FUSION = FAST.model_copy(update={"roi_bias_strength": 0.0, "learn_roi_bias": False})


def test_dual_view_uses_an_roi_view_that_carries_the_class():
    # Only the ROI view carries the class: neither the global embedding nor the patch tokens do.
    train, test, text = _dual_task(seed=0, global_signal=0.0, roi_view_signal=0.6, patch_signal=0.0)
    for class_text in (text, ClassText(text.class_names, None)):
        dual = fit("medfocus_dual", train, class_text, FAST, seed=0)
        whole_only = accuracy(fit("medfocus", train, class_text, WHOLE_IMAGE_FUSION, seed=0), test)
        assert accuracy(dual, test) > whole_only + 0.3, (accuracy(dual, test), whole_only)
        assert dual.fit_info["out_of_fold"]["gate_mean"] > 0.5
        assert dual.fit_info["hyperparameter_source"].startswith("gate fitted on out-of-fold predictions")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_view_keeps_the_whole_image_when_the_roi_view_missed(seed):
    train, test, text = _dual_task(seed=seed, global_signal=0.3, roi_view_signal=0.0)
    dual = fit("medfocus_dual", train, text, FAST, seed=seed)
    whole_only = accuracy(fit("medfocus", train, text, WHOLE_IMAGE_FUSION, seed=seed), test)
    assert whole_only > 0.6  # the comparison below is against a whole-image head that works
    assert abs(accuracy(dual, test) - whole_only) <= 0.03, (accuracy(dual, test), whole_only)
    assert dual.fit_info["out_of_fold"]["gate_mean"] < 0.2  # vs > 0.5 where the ROI view carries the class


def test_stacked_fusion_heads_train_as_they_would_one_by_one(task):
    # The dual view trains its out-of-fold whole-image heads stacked, one pass over the patch tokens for all of them.
    train, test, text = task
    inputs, test_inputs = (HeadInputs.from_features(part, with_patches=True) for part in (train, test))
    row_sets = [torch.arange(0, 40), torch.arange(20, 60), torch.arange(60)]

    def new_head(rows):
        return methods._new_fusion_head(text.class_means(), inputs.patches[rows], train.labels[rows], FAST,
                                        torch.Generator().manual_seed(len(rows)))

    alone = []
    for rows in row_sets:
        head = new_head(rows)
        training = methods._train_with_medfocus_loss(head, inputs.take(rows), train.labels[rows], FAST, torch.Generator(),
                                                     no_decay=head.no_decay_parameters())
        alone.append((head, training))
    stacked = [new_head(rows) for rows in row_sets]
    trainings = methods._train_fusion_heads_stacked(stacked, inputs, train.labels, row_sets, FAST)
    for (alone_head, alone_training), stacked_head, training in zip(alone, stacked, trainings):
        assert not torch.equal(alone_head.roi_bias, torch.full_like(alone_head.roi_bias, FAST.roi_bias_strength))  # it learned
        with torch.no_grad():
            torch.testing.assert_close(stacked_head(test_inputs), alone_head(test_inputs), rtol=0, atol=5e-3)
        for name, parameter in alone_head.named_parameters():
            torch.testing.assert_close(getattr(stacked_head, name), parameter, rtol=0, atol=1e-4)
        assert training["loss_history"] == pytest.approx(alone_training["loss_history"], abs=1e-5)
    with torch.no_grad():  # and the three heads differ: each saw its own rows
        assert not torch.allclose(stacked[0](test_inputs), stacked[1](test_inputs), atol=1e-2)


def test_dual_view_needs_the_roi_view(task):
    train, test, text = task
    assert ROI_VIEW_METHODS == ("medfocus_dual", "medfocus_select")
    without_view = FeatureSet(train.global_emb, train.patch_tokens, train.roi_weights, train.labels, train.hashes)
    with pytest.raises(MethodUnavailableError, match="roi_global.*'dual'"):
        fit("medfocus_dual", without_view, text, FAST, seed=0)
    model = fit("medfocus_dual", train, text, FAST, seed=0)
    with pytest.raises(FeatureMismatchError, match="no ROI view"):
        model.predict_proba(FeatureSet(test.global_emb, test.patch_tokens, test.roi_weights, test.labels, test.hashes))
    # Other methods ignore the ROI view: the same predictions with and without it.
    probe = fit("linear_probe", train, text, FAST, seed=0)
    assert torch.equal(probe.predict_proba(test), fit("linear_probe", without_view, text, FAST, seed=0).predict_proba(test))


def test_dual_view_falls_back_to_the_whole_image_without_an_roi(task):
    train, test, text = task
    model = fit("medfocus_dual", train, text, FAST, seed=0)
    no_roi = FeatureSet(test.global_emb, test.patch_tokens, torch.zeros_like(test.roi_weights), test.labels, test.hashes, test.roi_global)
    inputs = model.inputs(no_roi)
    assert torch.equal(model.head.gate(inputs), torch.zeros(len(test)))
    assert torch.equal(model.predict_logits(no_roi), model.head.whole(inputs))
    assert float(model.head.gate(model.inputs(test)).mean()) > 0.5  # with the ROI it leans on the ROI view


def test_dual_view_without_folds_uses_the_default_gate_and_round_trips(task, tmp_path):
    train, test, text = task
    one_per_class = train.subset(torch.cat([(train.labels == c).nonzero().flatten()[:1] for c in range(3)]))
    small = fit("medfocus_dual", one_per_class, text, FAST, seed=0)
    assert small.fit_info["hyperparameter_source"] == "fixed default gate 0.0 (subset too small for out-of-fold gate fitting: a class has 1 < 2 images)"
    assert torch.equal(small.head.gate(small.inputs(test)), torch.zeros(len(test)))
    half = fit("medfocus_dual", one_per_class, text, TrainConfig(epochs=40, dual_gate_default=0.5), seed=0)
    assert torch.allclose(half.head.gate(half.inputs(test)), torch.full((len(test),), 0.5))

    model = fit("medfocus_dual", train, text, FAST, seed=0)
    loaded = FittedModel.load(model.save(tmp_path / "dual.pt", extra_meta={"mode": "dual"}), expect={"mode": "dual"})
    assert loaded.method == "medfocus_dual"
    assert torch.equal(loaded.predict_proba(test), model.predict_proba(test))


# --- medfocus_select: the ROI setting chosen on validation ----------------------------------------------------------


def _misplaced_roi(features: FeatureSet, seed: int) -> FeatureSet:
    """The same images with every ROI moved onto other patches (a segmenter that missed): signal patches unmarked."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([row[torch.randperm(len(row), generator=generator)] for row in features.roi_weights])
    missed = torch.where(features.roi_weights > 0, torch.zeros_like(shuffled), shuffled.clamp(min=0.5))
    return FeatureSet(features.global_emb, features.patch_tokens, missed, features.labels, features.hashes,
                      torch.randn(features.roi_global.shape, generator=generator))


def test_select_takes_the_roi_when_the_class_is_in_the_roi():
    # 2 of 64 patches carry a weak class signal, the ROI view a strong one: the whole image alone is near chance.
    pool, text = synthetic_task(150, num_classes=3, embed_dim=32, num_patches=64, roi_patches=2, signal=0.35, seed=0,
                                roi_view_signal=0.6)
    train, test = pool.subset(range(60)), pool.subset(range(60, 150))
    chosen = fit("medfocus_select", train, text, FAST, seed=0)
    assert chosen.fit_info["hyperparameters"]["candidate"] in ("fusion_roi", "dual_view")
    assert chosen.fit_info["hyperparameter_source"] == "validation part of the training subset"
    assert set(chosen.fit_info["validation_scores"]) == {"fusion_whole", "fusion_roi", "dual_view"}
    whole_image = accuracy(fit("medfocus", FeatureSet(train.global_emb, train.patch_tokens, torch.zeros_like(train.roi_weights),
                                                      train.labels, train.hashes), text, FAST, seed=0), test)
    assert accuracy(chosen, test) > whole_image + 0.2, (accuracy(chosen, test), whole_image)


@pytest.mark.parametrize("seed", [0, 1])
def test_select_keeps_the_whole_image_when_the_roi_missed(seed):
    pool, text = synthetic_task(240, num_classes=3, embed_dim=32, num_patches=16, roi_patches=3, signal=0.6, seed=seed,
                                roi_view_signal=0.0)
    pool = _misplaced_roi(pool, seed)
    train, test = pool.subset(range(120)), pool.subset(range(120, 240))
    chosen = fit("medfocus_select", train, text, FAST, seed=seed)
    assert chosen.fit_info["hyperparameters"]["candidate"] == "fusion_whole", chosen.fit_info["validation_scores"]
    assert isinstance(chosen.head, FusionHead) and float(chosen.head.roi_bias.abs().max()) == 0.0
    roi_biased = accuracy(fit("medfocus", train, text, FAST, seed=seed), test)
    assert accuracy(chosen, test) > roi_biased + 0.1, (accuracy(chosen, test), roi_biased)


def test_select_without_a_validation_split_uses_its_default_and_round_trips(task, tmp_path):
    train, test, text = task
    two_per_class = train.subset(torch.cat([(train.labels == c).nonzero().flatten()[:2] for c in range(3)]))
    small = fit("medfocus_select", two_per_class, text, TrainConfig(epochs=5, select_default="fusion_roi"), seed=0)
    assert small.fit_info["hyperparameters"]["candidate"] == "fusion_roi"
    assert small.fit_info["hyperparameter_source"].startswith("fixed defaults (subset too small for a validation split")
    model = fit("medfocus_select", train, text, FAST, seed=0)
    loaded = FittedModel.load(model.save(tmp_path / "select.pt", extra_meta={"mode": "dual"}), expect={"mode": "dual"})
    assert (loaded.method, loaded.head_kind) == ("medfocus_select", model.head_kind)
    assert torch.equal(loaded.predict_proba(test), model.predict_proba(test))


def test_stratified_folds_cover_every_image_once():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    folds = stratified_folds(labels, 3, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(15))
    assert all(torch.bincount(labels[fold], minlength=3).min() >= 1 for fold in folds)
    assert stratified_folds(labels, 4, seed=0) == "subset too small for 4 folds: class 1 has 3 < 4 images"


# --- inputs, saving, refusing -------------------------------------------------------------------------------------


def test_feature_set_checks_shapes_and_subsets(task):
    train, _, _ = task
    with pytest.raises(FeatureMismatchError, match="patch_tokens"):
        FeatureSet(train.global_emb, train.patch_tokens[:-1], train.roi_weights, train.labels, train.hashes)
    narrower = FeatureSet(train.global_emb, train.patch_tokens[:, :, :8], train.roi_weights, train.labels, train.hashes)
    assert (narrower.embed_dim, narrower.token_dim) == (32, 8)  # an encoder bank: tokens of one encoder, globals of all
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FeatureSet(train.global_emb, train.patch_tokens, train.roi_weights * 2, train.labels, train.hashes)
    half = FeatureSet(train.global_emb.half(), train.patch_tokens.half(), train.roi_weights, train.labels, train.hashes)
    assert half.global_emb.dtype == torch.float32
    picked = train.subset([5, 2])
    assert picked.hashes == [train.hashes[5], train.hashes[2]] and torch.equal(picked.labels, train.labels[[5, 2]])
    assert torch.equal(picked.roi_global, train.roi_global[[5, 2]])
    with pytest.raises(FeatureMismatchError, match="roi_global must be"):
        FeatureSet(train.global_emb, train.patch_tokens, train.roi_weights, train.labels, train.hashes, train.roi_global[:, :8])


def test_text_of_another_encoder_is_refused(task):
    train, _, text = task
    wider = ClassText(text.class_names, F.normalize(torch.randn(3, 2, 64), dim=-1))
    with pytest.raises(FeatureMismatchError, match="different encoders"):
        fit("medfocus", train, wider, FAST, seed=0)


def test_validation_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 12)
    fit_idx, val_idx = validation_split(labels, 0.25, 4, seed=0)
    assert set(fit_idx.tolist()).isdisjoint(val_idx.tolist()) and len(fit_idx) + len(val_idx) == 24
    assert torch.bincount(labels[val_idx]).tolist() == [2, 1, 3]
    reason = validation_split(torch.tensor([0, 0, 0, 1, 1, 1, 1]), 0.25, 4, seed=0)
    assert isinstance(reason, str) and "class 0 has 3 < 4" in reason


def test_save_load_round_trip_and_refusals(task, tmp_path):
    train, test, text = task
    model = fit("medfocus", train, text, FAST, seed=0)
    meta = {"feature_store_key": "abc123", "model": "ViT-B-32", "mode": "attention", "weights_source": "random-init"}
    path = model.save(tmp_path / "head.pt", extra_meta={**meta, "store": tmp_path})
    loaded = FittedModel.load(path, expect={"feature_store_key": "abc123", "mode": "attention", "method": "medfocus"})
    assert torch.equal(loaded.predict_proba(test), model.predict_proba(test))
    assert loaded.config == model.config and loaded.class_names == text.class_names
    assert loaded.meta["store"] == str(tmp_path) and loaded.meta["weights_source"] == "random-init"
    assert torch.equal(fusion_attention(loaded, test), fusion_attention(model, test))

    with pytest.raises(ModelMismatchError) as caught:
        FittedModel.load(path, expect={"mode": "none", "model": "ViT-B-16", "feature_store_key": "abc123"})
    message = str(caught.value)
    assert "mode: saved 'attention', expected 'none'" in message and "ViT-B-16" in message and "feature_store_key" not in message
    with pytest.raises(ModelMismatchError, match="not recorded"):
        FittedModel.load(path, expect={"dataset": "covid"})
    with pytest.raises(ModelMismatchError, match="class_names"):
        FittedModel.load(path, expect={"class_names": ["a", "b", "c"]})
    (tmp_path / "other.pt").write_bytes(b"not a model")
    with pytest.raises(ModelMismatchError, match="not a medfocus trainer model"):
        FittedModel.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="medfocus train"):
        FittedModel.load(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="JSON-like"):
        model.save(tmp_path / "bad.pt", extra_meta={"tensor": torch.zeros(1)})


@pytest.mark.parametrize("method", ["tip_adapter_f", "linear_probe", "zero_shot"])
def test_baselines_round_trip(task, tmp_path, method):
    train, test, text = task
    model = fit(method, train, text, FAST, seed=0)
    loaded = FittedModel.load(model.save(tmp_path / f"{method}.pt", extra_meta={"mode": "none"}), expect={"mode": "none"})
    assert loaded.method == method
    assert torch.equal(loaded.predict_proba(test), model.predict_proba(test))


def test_features_of_another_encoder_are_refused_at_predict(task):
    train, test, text = task
    model = fit("medfocus", train, text, FAST, seed=0)
    other_width, _ = synthetic_task(6, embed_dim=48, num_patches=16)
    with pytest.raises(FeatureMismatchError, match="32-d"):
        model.predict_proba(other_width)
    other_grid, _ = synthetic_task(6, embed_dim=32, num_patches=25)
    with pytest.raises(FeatureMismatchError, match="16 patch tokens"):
        model.predict_proba(other_grid)


def test_fusion_attention_looks_at_the_roi(task):
    train, test, text = task
    model = fit("medfocus", train, text, FAST, seed=0)
    attention = fusion_attention(model, test)
    assert attention.shape == (len(test), 3, 16)
    assert torch.allclose(attention.sum(dim=-1), torch.ones(len(test), 3), atol=1e-5)
    inside = (attention * (test.roi_weights == 1)[:, None, :]).sum(dim=-1)
    assert float(inside.mean()) > 0.5  # 3 of 16 patches hold most of the attention
    with pytest.raises(MethodUnavailableError, match="only medfocus"):
        fusion_attention(fit("clip_fewshot", train, text, FAST, seed=0), test)


def test_config_uses_the_params_yaml_spelling():
    config = TrainConfig.model_validate({"lambda": 0.25, "epochs": 3})
    assert config.lambda_ == 0.25 and config.model_dump(by_alias=True)["lambda"] == 0.25
    with pytest.raises(ValueError, match="lamda"):
        TrainConfig.model_validate({"lamda": 0.25})
    with pytest.raises(ValueError):
        TrainConfig(**{"lambda": 1.5})
    assert all(field.description for field in TrainConfig.model_fields.values())


# --- metrics, aggregation, plots ----------------------------------------------------------------------------------


def test_metrics_on_a_hand_computed_example():
    names = ["a", "b", "c"]
    y_true = [0, 0, 0, 1, 1, 2]
    proba = np.array([
        [0.8, 0.1, 0.1],  # a → a
        [0.6, 0.3, 0.1],  # a → a
        [0.2, 0.7, 0.1],  # a → b
        [0.3, 0.6, 0.1],  # b → b
        [0.5, 0.4, 0.1],  # b → a
        [0.1, 0.2, 0.7],  # c → c
    ])
    metrics = compute_metrics(y_true, proba, names)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: a = 2·2/(3+3), b = 2·1/(2+2), c = 1
    assert metrics["macro_f1"] == pytest.approx((4 / 6 + 2 / 4 + 1) / 3)
    # AUROC a: positives 0.8, 0.6, 0.2 vs negatives 0.3, 0.5, 0.1 → 3 + 3 + 1 = 7 of 9 pairs ordered right.
    # b: positives 0.6, 0.4 vs 0.1, 0.3, 0.7, 0.2 → (3 + 3)/8.  c: 0.7 above all five → 1.
    assert metrics["auroc_per_class"] == pytest.approx({"a": 7 / 9, "b": 6 / 8, "c": 1.0})
    assert metrics["auroc_ovr"] == pytest.approx((7 / 9 + 6 / 8 + 1) / 3)
    assert metrics["auroc_skipped"] == {}


def test_metrics_skip_a_class_missing_from_y_true_and_say_so():
    names = ["a", "b", "c"]
    y_true = torch.tensor([0, 1, 1, 0])
    proba = torch.tensor([[0.5, 0.2, 0.3], [0.2, 0.5, 0.3], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    metrics = compute_metrics(y_true, proba, names)
    assert metrics["auroc_skipped"] == {"c": "no samples of this class in y_true"}
    # a: positives 0.5, 0.1 vs negatives 0.2, 0.5 → (1 + 0.5 + 0 + 0)/4; b: 0.5, 0.5 vs 0.2, 0.1 → 1. Ties count one half.
    assert metrics["auroc_per_class"] == pytest.approx({"a": 0.375, "b": 1.0})
    assert metrics["auroc_ovr"] == pytest.approx((0.375 + 1.0) / 2)
    assert metrics["per_class_recall"]["c"] is None
    # Predictions: a, b, a (tie → first), c. Balanced accuracy over the present classes a, b: (1/2 + 1/2)/2.
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    # Macro-F1 over classes in y_true ∪ y_pred = a, b, c: a 2·1/(2+2), b 2·1/(2+1), c 0.
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def _run(method, seed, accuracy_value, fraction=0.05, source="openai"):
    return {
        "method": method, "mode": "attention", "fraction": fraction, "shots": None, "seed": seed, "weights_source": source,
        "accuracy": accuracy_value, "balanced_accuracy": accuracy_value, "macro_f1": accuracy_value, "auroc_ovr": None,
        "per_class_recall": {"a": accuracy_value, "b": None},
    }


def test_aggregate_mean_and_sample_std_per_group():
    runs = [_run("medfocus", 0, 0.5), _run("medfocus", 1, 0.7), _run("medfocus", 0, 0.9, fraction=0.1), _run("zero_shot", 0, 0.4)]
    groups = {(g["method"], g["fraction"]): g for g in aggregate(runs)["groups"]}
    five_percent = groups[("medfocus", 0.05)]
    assert five_percent["accuracy"]["mean"] == pytest.approx(0.6)
    assert five_percent["accuracy"]["std"] == pytest.approx(math.sqrt(0.02))
    assert five_percent["seeds"] == [0, 1] and five_percent["auroc_ovr"] == {"mean": None, "std": None, "n": 0}
    assert five_percent["per_class_recall"]["b"]["n"] == 0
    assert groups[("medfocus", 0.1)]["accuracy"] == {"mean": 0.9, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="weights sources"):
        aggregate([_run("medfocus", 0, 0.5), _run("medfocus", 1, 0.7, source="random-init")])
    with pytest.raises(ValueError, match="repeated seeds"):
        aggregate([_run("medfocus", 0, 0.5), _run("medfocus", 0, 0.7)])


def test_bootstrap_interval_of_the_accuracy():
    rng = np.random.default_rng(0)
    correct = (rng.random((3, 200)) < 0.7).astype(int)
    low, high = bootstrap_accuracy_ci(correct)
    # Three independent runs on 200 images: width ≈ 2·1.96·sqrt(0.7·0.3/(3·200)) ≈ 0.073.
    assert low < correct.mean() < high and 0.06 < high - low < 0.09
    assert bootstrap_accuracy_ci(correct) == (low, high)  # seeded
    wider = bootstrap_accuracy_ci(correct[:, :50])
    assert wider[1] - wider[0] > high - low
    assert bootstrap_accuracy_ci(np.ones(20)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="N > 0"):
        bootstrap_accuracy_ci(np.zeros((2, 0)))


def test_aggregate_adds_the_bootstrap_interval_when_runs_carry_per_image_results():
    with_images = [_run("medfocus", seed, 0.5) | {"correct": [1, 0] * 10} for seed in (0, 1)]
    group = aggregate(with_images)["groups"][0]
    low, high = group["accuracy_ci95"]
    assert low < 0.5 < high
    assert aggregate([_run("medfocus", 0, 0.5)])["groups"][0]["accuracy_ci95"] is None
    with pytest.raises(ValueError, match="different numbers of images"):
        aggregate([with_images[0], _run("medfocus", 1, 0.5) | {"correct": [1, 0]}])


def test_runs_csv_has_one_row_per_run(tmp_path):
    metrics = compute_metrics([0, 1, 1], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], ["a", "b"])
    runs = [{"method": "medfocus", "mode": "none", "fraction": 0.05, "shots": None, "seed": s, "weights_source": "openai", **metrics,
             "correct": [1, 1, 0]} for s in (0, 1)]
    with write_runs_csv(runs, tmp_path / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and rows[1]["seed"] == "1"
    assert float(rows[0]["accuracy"]) == pytest.approx(2 / 3) and rows[0]["recall[b]"] == "0.5"
    assert rows[0]["confusion_matrix"] == "[[1, 0], [1, 1]]"
    assert "correct" not in rows[0]  # per-image values stay out of the CSV


def test_plots_write_png_files(tmp_path, task):
    runs = [_run(method, seed, 0.4 + 0.1 * seed + fraction / 4, fraction=fraction, source="random-init")
            for method in ("medfocus", "zero_shot") for seed in range(3) for fraction in (0.05, 0.1, 0.2)]
    curve = plot_accuracy_vs_fraction(aggregate(runs), tmp_path / "curve.png", "covid", "random-init", random_init=True)
    four_modes = [run | {"mode": mode} for run in runs for mode in ("none", "crop", "attention", "dual")]
    panels = plot_accuracy_vs_fraction(aggregate(four_modes), tmp_path / "panels.png", "covid", "random-init", random_init=True)
    with Image.open(curve) as one, Image.open(panels) as grid:
        assert grid.size[0] > one.size[0] and grid.size[1] > one.size[1]  # one panel per mode, 3 per row
    matrix = plot_confusion_matrix([[5, 1], [2, 7]], ["covid", "normal"], tmp_path / "cm.png", "medfocus 5%")
    train, test, text = task
    model = fit("medfocus", train, text, FAST, seed=0)
    attention = fusion_attention(model, test)[0, int(test.labels[0])]
    image = np.random.default_rng(0).integers(0, 255, size=(64, 64), dtype=np.uint8)
    overlay = plot_attention_overlay(image, test.roi_weights[0], attention, tmp_path / "overlay.png", "image 0")
    for path in (curve, panels, matrix, overlay):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
