"""``fit`` for every method of the harness, and the fitted model that predicts, saves and loads.

Methods (all on the same cached features and splits):

* ``zero_shot``     — cosine of the global embedding with each class's mean prompt embedding; no training.
* ``linear_probe``  — logistic regression (L-BFGS, L2 penalty in scikit-learn's C convention) on normalised global
                      embeddings; C chosen on a validation part of the training subset, else a fixed default.
* ``tip_adapter``   — Tip-Adapter (Zhang et al. 2022): zero-shot logits + a training-free cache model; α/β chosen on the
                      validation part, else the paper's α=1, β=5.5.
* ``tip_adapter_f`` — Tip-Adapter-F: the cache keys fine-tuned with cross-entropy (no image augmentation here: the cache
                      holds one feature per image), α/β chosen on the validation part after fine-tuning on the fit part.
* ``clip_fewshot``  — the paper's "CLIP after few-shot training" line: global embedding only (no patches, no ROI), class
                      embeddings initialised from the prompts and trained with the same loss, optimiser and epochs as
                      medfocus. It should be given features of mode ``none``.
* ``medfocus``      — the fusion head (:class:`~medfocus.trainer.heads.FusionHead`) on ROI-steered features, loss
                      λ·L_c + (1−λ)·L_e. Its settings are fixed in advance (TrainConfig), not searched.
* ``medfocus_dual`` — the dual-view head (:class:`~medfocus.trainer.heads.DualViewHead`) on features of mode ``dual``:
                      a whole-image branch (the fusion head with the ROI bias fixed at 0, what medfocus gives in mode
                      ``none``) and an ROI-view branch (trained like clip_fewshot on the ROI view) blended per image by
                      a gate fitted on out-of-fold predictions of the training subset, so an ROI view that does not help
                      gets a gate near 0 (whole image only) and one that helps gets weight. Needs ``roi_global``.
* ``medfocus_select`` — medfocus with its ROI setting chosen on a validation part of the training subset, never on test:
                      the fusion head on the whole image (ROI bias fixed at 0, what mode ``none`` gives), the fusion head
                      with the ROI bias, or the dual-view head; the best on validation is refitted on the whole subset.
                      Needs features of mode ``dual`` (they hold the whole image's tokens and the ROI).

Without class text (an encoder with no text tower), ``zero_shot`` is refused and every other method starts its class
embeddings from the training-class prototypes (normalised mean global embedding per class).

Everything random goes through a local ``torch.Generator`` / ``np.random.default_rng`` seeded with ``seed``: the same
seed on the same CPU with the same thread count gives bit-identical probabilities.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import METHODS, PATCH_METHODS, ROI_VIEW_METHODS, SELECT_CANDIDATES, TEXT_FREE_METHODS, TrainConfig
from .data import ClassText, FeatureMismatchError, FeatureSet, check_compatible, stratified_folds, validation_split
from .heads import (FUSION_NO_DECAY, FUSION_PARAMETERS, HEADS, CosineClassifierHead, DualViewHead, FusionHead, HeadInputs,
                    LinearProbeHead, TipAdapterHead, build_head, fusion_logits)
from .losses import medfocus_loss

FILE_FORMAT = "medfocus-trainer-head/2"  # 2: the dual-view head's whole-image branch is a fusion head


class ModelMismatchError(FeatureMismatchError):
    """A saved model was asked to serve features it was not trained on (other store, model, mode or classes)."""


class MethodUnavailableError(ValueError):
    """The method cannot run with what it was given (e.g. zero_shot without class text)."""


class FittedModel:
    """A trained (or training-free) head with everything needed to predict, save and reload it."""

    def __init__(self, method: str, head: nn.Module, config: TrainConfig, class_names: list[str], fit_info: dict, meta: dict | None = None):
        self.method = method
        self.head = head.eval()
        self.config = config
        self.class_names = list(class_names)
        self.fit_info = fit_info
        self.meta = dict(meta or {})

    @property
    def head_kind(self) -> str:
        return next(kind for kind, head_class in HEADS.items() if type(self.head) is head_class)

    @property
    def embed_dim(self) -> int:
        return self.head.architecture["embed_dim"]

    def check_features(self, features: FeatureSet) -> None:
        """Refuse features from another encoder (width) or, for the fusion head, another patch grid."""
        if features.embed_dim != self.embed_dim:
            raise FeatureMismatchError(
                f"this {self.method} model was trained on {self.embed_dim}-d features; these are {features.embed_dim}-d "
                "(another encoder): use the model trained on this feature store"
            )
        expected_patches = self.head.architecture.get("num_patches")
        if expected_patches is not None and features.num_patches != expected_patches:
            raise FeatureMismatchError(
                f"this {self.method} model was trained on {expected_patches} patch tokens per image; these have "
                f"{features.num_patches} (another encoder or input size)"
            )
        expected_width = self.head.architecture.get("token_dim")
        if expected_width is not None and features.token_dim != expected_width:
            raise FeatureMismatchError(
                f"this {self.method} model was trained on {expected_width}-d patch tokens; these are {features.token_dim}-d "
                "(another encoder bank)"
            )

    def inputs(self, features: FeatureSet) -> HeadInputs:
        self.check_features(features)
        return HeadInputs.from_features(features, with_patches=self.head.uses_patches, with_roi_view=self.head.uses_roi_view)

    @torch.no_grad()
    def predict_logits(self, features: FeatureSet) -> Tensor:
        return self.head(self.inputs(features))

    def predict_proba(self, features: FeatureSet) -> Tensor:
        """(N, C) class probabilities, rows summing to 1."""
        return self.predict_logits(features).softmax(dim=-1)

    def state_dict(self) -> dict[str, Any]:
        """Everything a saved model holds except the caller's metadata."""
        return {
            "format": FILE_FORMAT,
            "method": self.method,
            "head_kind": self.head_kind,
            "architecture": dict(self.head.architecture),
            "state_dict": {name: value.detach().clone() for name, value in self.head.state_dict().items()},
            "config": self.config.model_dump(by_alias=True),
            "class_names": self.class_names,
            "fit_info": _json_like(self.fit_info),
            "torch_version": str(torch.__version__),
        }

    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        """Write the model with its full config; ``extra_meta`` (feature-store key, model, mode, weights source, …)
        must be JSON-like (paths become strings) so the file loads with ``torch.load(weights_only=True)``."""
        meta = {**self.meta, **_json_like(extra_meta or {})}
        payload = {**self.state_dict(), "meta": meta}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
        self.meta = meta
        return path

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> "FittedModel":
        """Load a saved model; refuse it when any ``expect`` item (a ``meta`` key, or ``method`` / ``class_names``)
        differs from what was saved, naming every mismatch."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trained model at {path}: run `medfocus train` for this dataset first")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for foreign or corrupt files
            raise ModelMismatchError(f"{path} is not a medfocus trainer model file ({type(error).__name__}: {error})") from None
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ModelMismatchError(f"{path} is not a medfocus trainer model file (format {found!r}, expected {FILE_FORMAT!r})")
        meta = payload.get("meta", {})
        mismatches = []
        for key, wanted in (expect or {}).items():
            if key in meta:
                saved = meta[key]
            elif key in ("method", "class_names"):
                saved = payload[key]
            else:
                mismatches.append(f"{key}: not recorded in the saved model, expected {wanted!r}")
                continue
            if _json_like(saved) != _json_like(wanted):
                mismatches.append(f"{key}: saved {saved!r}, expected {wanted!r}")
        if mismatches:
            raise ModelMismatchError(
                f"refusing the model at {path}: it does not match the features it would be used with\n  "
                + "\n  ".join(mismatches)
                + "\nRetrain it on this feature store (`medfocus train`) or use the model trained on it."
            )
        head = build_head(payload["head_kind"], payload["architecture"])
        head.load_state_dict(payload["state_dict"])
        config = TrainConfig.model_validate(payload["config"])
        return cls(payload["method"], head, config, payload["class_names"], payload["fit_info"], meta)


def _json_like(value: Any) -> Any:
    def encode(item: Any) -> Any:
        if isinstance(item, Path):
            return str(item)
        raise TypeError(f"model metadata must be JSON-like (str, number, bool, None, list, dict); got {type(item).__name__}: {item!r}")

    return json.loads(json.dumps(value, default=encode))


def fit(method: str, train: FeatureSet, text: ClassText, config: TrainConfig, seed: int) -> FittedModel:
    """Fit ``method`` on the training subset ``train`` (hyperparameters chosen inside it, never on test data)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(train) == 0:
        raise ValueError("the training subset is empty")
    check_compatible(train, text)
    if method == "zero_shot" and text.embeddings is None:
        raise MethodUnavailableError(
            "zero_shot needs class prompt embeddings, and this encoder has no text tower (e.g. LiteMedSAM); "
            f"methods that work without text start from class prototypes: {', '.join(TEXT_FREE_METHODS)}"
        )
    if method in ROI_VIEW_METHODS and train.roi_global is None:
        raise MethodUnavailableError(
            f"{method} needs the ROI view of every image (roi_global), which only feature stores of mode 'dual' hold; "
            "these features have none"
        )
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    inputs = HeadInputs.from_features(train, with_patches=method in PATCH_METHODS, with_roi_view=method in ROI_VIEW_METHODS)
    labels = train.labels
    class_init, init_source = _class_init(text, inputs.image, labels)
    fitter = _FITTERS[method]
    if method in ROI_VIEW_METHODS:
        fitter = functools.partial(fitter, text=text)  # each fold starts its class embeddings from its own images
    head, info = fitter(inputs, labels, class_init, config, seed, generator)
    counts = torch.bincount(labels, minlength=text.num_classes).tolist()
    fit_info = {
        "method": method,
        "seed": seed,
        "n_train": len(train),
        "class_counts": dict(zip(text.class_names, counts)),
        "class_init": init_source,
        "embed_dim": train.embed_dim,
        "num_patches": train.num_patches,
        **info,
        "fit_seconds": time.perf_counter() - started,
    }
    return FittedModel(method, head, config, text.class_names, fit_info)


def fusion_attention(model: FittedModel, features: FeatureSet) -> Tensor:
    """(N, C, L) attention of each class query over the patches (mean over heads), for the predict overlays."""
    if not isinstance(model.head, FusionHead):
        raise MethodUnavailableError(f"only medfocus models have a fusion attention; this model is {model.method}")
    with torch.no_grad():
        return model.head.attention(model.inputs(features)).mean(dim=2)


def _class_init(text: ClassText, image: Tensor, labels: Tensor) -> tuple[Tensor, str]:
    means = text.class_means()
    if means is not None:
        return means, "text"
    counts = torch.bincount(labels, minlength=text.num_classes)
    missing = [name for name, count in zip(text.class_names, counts.tolist()) if count == 0]
    if missing:
        raise MethodUnavailableError(
            f"classes {missing} have no training images and there is no class text to start them from "
            "(encoder without a text tower): every class needs at least one training image"
        )
    sums = torch.zeros(text.num_classes, image.shape[1]).index_add_(0, labels, image)
    return F.normalize(sums / counts[:, None], dim=-1), "prototypes"


def _selection_score(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """Validation accuracy (higher better), then negative log-likelihood (lower better) to break ties."""
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    return accuracy, float(F.cross_entropy(logits, labels))


def _better(candidate: tuple[float, float], best: tuple[float, float] | None) -> bool:
    return best is None or candidate[0] > best[0] or (candidate[0] == best[0] and candidate[1] < best[1])


def _split_info(split) -> dict:
    if isinstance(split, str):
        return {"hyperparameter_source": f"fixed defaults ({split})", "n_fit": None, "n_val": None}
    fit_idx, val_idx = split
    return {"hyperparameter_source": "validation part of the training subset", "n_fit": len(fit_idx), "n_val": len(val_idx)}


# --- zero_shot ----------------------------------------------------------------------------------------------------


def _fit_zero_shot(inputs, labels, class_init, config: TrainConfig, seed, generator):
    head = CosineClassifierHead(class_init.shape[1], class_init.shape[0], config.zero_shot_logit_scale, trainable=False)
    with torch.no_grad():
        head.class_embeddings.copy_(class_init)
    return head, {"hyperparameters": {"logit_scale": config.zero_shot_logit_scale}, "hyperparameter_source": "fixed (CLIP)"}


# --- linear_probe -------------------------------------------------------------------------------------------------


def _logistic_regression(inputs: HeadInputs, labels: Tensor, num_classes: int, inverse_l2: float, max_iter: int) -> LinearProbeHead:
    """Minimise mean CE + ||W||² / (2·C·N): scikit-learn's C·ΣCE + ½||W||² divided by C·N (intercept unpenalised)."""
    head = LinearProbeHead(inputs.image.shape[1], num_classes)
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * inverse_l2 * len(labels))

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(head(inputs), labels) + penalty * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return head


def _fit_linear_probe(inputs, labels, class_init, config: TrainConfig, seed, generator):
    num_classes = class_init.shape[0]
    split = validation_split(labels, config.val_fraction, config.val_min_per_class, seed)
    if isinstance(split, str):
        chosen = config.linear_probe_c_default
        scores = {}
    else:
        fit_idx, val_idx = split
        fit_inputs, val_inputs = inputs.take(fit_idx), inputs.take(val_idx)
        best, chosen, scores = None, None, {}
        for inverse_l2 in config.linear_probe_c_grid:
            head = _logistic_regression(fit_inputs, labels[fit_idx], num_classes, inverse_l2, config.linear_probe_max_iter)
            with torch.no_grad():
                score = _selection_score(head(val_inputs), labels[val_idx])
            scores[str(inverse_l2)] = {"val_accuracy": score[0], "val_nll": score[1]}
            if _better(score, best):
                best, chosen = score, inverse_l2
    head = _logistic_regression(inputs, labels, num_classes, chosen, config.linear_probe_max_iter)
    return head, {"hyperparameters": {"C": chosen}, **_split_info(split), "validation_scores": scores}


# --- tip_adapter / tip_adapter_f ----------------------------------------------------------------------------------


def _tip_head(inputs: HeadInputs, labels: Tensor, class_init: Tensor, config: TrainConfig, alpha: float, beta: float, trainable: bool) -> TipAdapterHead:
    num_classes, embed_dim = class_init.shape
    head = TipAdapterHead(embed_dim, num_classes, len(labels), config.zero_shot_logit_scale, trainable_keys=trainable)
    with torch.no_grad():
        head.class_embeddings.copy_(class_init)
        head.keys.copy_(inputs.image)
        head.cache_values.copy_(F.one_hot(labels, num_classes).float())
        head.alpha.fill_(alpha)
        head.beta.fill_(beta)
    return head


def _fine_tune_keys(head: TipAdapterHead, inputs: HeadInputs, labels: Tensor, config: TrainConfig, generator: torch.Generator) -> list[float]:
    optimiser = torch.optim.AdamW([head.keys], lr=config.tip_f_lr, eps=1e-4, weight_decay=0.0, fused=True)
    return _run_epochs(head, optimiser, inputs, labels, config.tip_f_epochs, config.batch_size, config.lr_schedule, generator,
                       lambda logits, target: (F.cross_entropy(logits, target), {}))


def _search_alpha_beta(head: TipAdapterHead, val_inputs: HeadInputs, val_labels: Tensor, config: TrainConfig):
    best, chosen, scores = None, None, {}
    with torch.no_grad():
        zero_shot = head.zero_shot_logits(val_inputs)
        affinity = head.affinity(val_inputs)
        for beta in config.tip_beta_grid:
            cache_logits = torch.exp(-beta * (1.0 - affinity)) @ head.cache_values
            for alpha in config.tip_alpha_grid:
                score = _selection_score(zero_shot + alpha * cache_logits, val_labels)
                scores[f"alpha={alpha},beta={beta}"] = {"val_accuracy": score[0], "val_nll": score[1]}
                if _better(score, best):
                    best, chosen = score, (alpha, beta)
    return chosen, scores


def _fit_tip(inputs, labels, class_init, config: TrainConfig, seed, generator, trainable: bool):
    split = validation_split(labels, config.val_fraction, config.val_min_per_class, seed)
    alpha, beta, scores = config.tip_alpha_default, config.tip_beta_default, {}
    if not isinstance(split, str):
        fit_idx, val_idx = split
        probe = _tip_head(inputs.take(fit_idx), labels[fit_idx], class_init, config, alpha, beta, trainable)
        if trainable:
            _fine_tune_keys(probe, inputs.take(fit_idx), labels[fit_idx], config, generator)
        (alpha, beta), scores = _search_alpha_beta(probe, inputs.take(val_idx), labels[val_idx], config)
    head = _tip_head(inputs, labels, class_init, config, alpha, beta, trainable)
    info = {"hyperparameters": {"alpha": alpha, "beta": beta}, **_split_info(split), "validation_scores": scores}
    if trainable:
        info["loss_history"] = _fine_tune_keys(head, inputs, labels, config, generator)
    return head, info


def _fit_tip_adapter(inputs, labels, class_init, config, seed, generator):
    return _fit_tip(inputs, labels, class_init, config, seed, generator, trainable=False)


def _fit_tip_adapter_f(inputs, labels, class_init, config, seed, generator):
    return _fit_tip(inputs, labels, class_init, config, seed, generator, trainable=True)


# --- clip_fewshot / medfocus --------------------------------------------------------------------------------------


def _lr_lambda(schedule: str, total_steps: int):
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _run_epochs(head: nn.Module, optimiser, inputs: HeadInputs, labels: Tensor, epochs: int, batch_size: int, schedule: str,
                generator: torch.Generator, loss_fn) -> list[float]:
    """Mini-batch (full batch when the subset fits in one) training; returns the mean loss of each epoch."""
    samples = len(labels)
    steps_per_epoch = math.ceil(samples / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(schedule, epochs * steps_per_epoch))
    head.train()
    history = []
    for _ in range(epochs):
        order = torch.randperm(samples, generator=generator) if steps_per_epoch > 1 else None
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            if order is None:
                batch_inputs, batch_labels = inputs, labels
            else:
                index = order[step * batch_size:(step + 1) * batch_size]
                batch_inputs, batch_labels = inputs.take(index), labels[index]
            loss, _ = loss_fn(head(batch_inputs), batch_labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * len(batch_labels)
        history.append(epoch_loss / samples)
    head.eval()
    return history


def _adamw(parameters: list[nn.Parameter], no_decay: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the trainable ``parameters``, without weight decay on ``no_decay``."""
    no_decay_ids = {id(parameter) for parameter in no_decay}
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in no_decay_ids], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.lr, fused=True)


def _train_with_medfocus_loss(head: nn.Module, inputs: HeadInputs, labels: Tensor, config: TrainConfig, generator: torch.Generator,
                              no_decay: list[nn.Parameter]) -> dict:
    optimiser = _adamw(list(head.parameters()), no_decay, config)
    history = _run_epochs(head, optimiser, inputs, labels, config.epochs, config.batch_size, config.lr_schedule, generator,
                          lambda logits, target: medfocus_loss(logits, target, config.lambda_))
    with torch.no_grad():
        _, components = medfocus_loss(head(inputs), labels, config.lambda_)
    return {"loss_history": history, "final_loss_components": components}


def _train_cosine_head(inputs: HeadInputs, labels: Tensor, class_init: Tensor, config: TrainConfig,
                       generator: torch.Generator) -> tuple[CosineClassifierHead, dict]:
    """The few-shot CLIP head: class embeddings from ``class_init``, trained on the global embedding with the medfocus loss."""
    num_classes, embed_dim = class_init.shape
    head = CosineClassifierHead(embed_dim, num_classes, 1.0 / config.temperature, trainable=True, learn_logit_scale=config.learn_temperature)
    with torch.no_grad():
        head.class_embeddings.copy_(class_init)
    info = _train_with_medfocus_loss(head, inputs, labels, config, generator, no_decay=list(head.parameters()))
    return head, info


def _fit_clip_fewshot(inputs, labels, class_init, config: TrainConfig, seed, generator):
    head, info = _train_cosine_head(inputs, labels, class_init, config, generator)
    hyperparameters = {"lambda": config.lambda_, "epochs": config.epochs, "lr": config.lr}
    return head, {"hyperparameters": hyperparameters, "hyperparameter_source": "fixed in advance (TrainConfig)", **info}


def _query_init(class_init: Tensor, patches: Tensor, labels: Tensor) -> Tensor | None:
    """The class queries' start when the tokens are narrower than the global embedding (an encoder bank): each class's
    mean token, normalised; None (start from ``class_init``) when they share its width."""
    if patches.shape[2] == class_init.shape[1]:
        return None
    sums = torch.zeros(class_init.shape[0], patches.shape[2]).index_add_(0, labels, patches.mean(dim=1))
    counts = torch.bincount(labels, minlength=class_init.shape[0]).clamp(min=1)
    return F.normalize(sums / counts[:, None], dim=-1)


def _new_fusion_head(class_init: Tensor, patches: Tensor, labels: Tensor, config: TrainConfig,
                     generator: torch.Generator) -> FusionHead:
    """A fusion head for these (normalised) training tokens, initialised from ``class_init``."""
    num_classes, embed_dim = class_init.shape
    head = FusionHead(
        embed_dim, num_classes, heads=config.attention_heads, head_dim=config.head_dim,
        roi_bias_strength=config.roi_bias_strength, learn_roi_bias=config.learn_roi_bias,
        logit_scale=1.0 / config.temperature, learn_logit_scale=config.learn_temperature, num_patches=patches.shape[1],
        token_dim=patches.shape[2],
    )
    head.initialise(class_init, generator, _query_init(class_init, patches, labels))
    return head


def _fusion_fit_info(head: FusionHead, config: TrainConfig, training: dict) -> dict:
    hyperparameters = {
        "lambda": config.lambda_, "epochs": config.epochs, "lr": config.lr,
        "roi_bias": head.roi_bias.detach().tolist(),
    }
    return {"hyperparameters": hyperparameters, "hyperparameter_source": "fixed in advance (TrainConfig)", **training}


def _fit_medfocus(inputs, labels, class_init, config: TrainConfig, seed, generator):
    head = _new_fusion_head(class_init, inputs.patches, labels, config, generator)
    info = _train_with_medfocus_loss(head, inputs, labels, config, generator, no_decay=head.no_decay_parameters())
    return head, _fusion_fit_info(head, config, info)


def _train_fusion_heads_stacked(heads: list[FusionHead], inputs: HeadInputs, labels: Tensor, row_sets: list[Tensor],
                                config: TrainConfig) -> list[dict]:
    """Full-batch training of fusion heads of one architecture, head i on the subset rows ``row_sets[i]``, as one stacked
    model: each step is one pass over the shared patch tokens for all heads. Head i's loss sees only its rows and AdamW
    is elementwise, so every head gets the updates it would get alone, up to float rounding."""
    stacked = {name: nn.Parameter(torch.stack([getattr(head, name).detach() for head in heads]),
                                  requires_grad=getattr(heads[0], name).requires_grad) for name in FUSION_PARAMETERS}
    optimiser = _adamw(list(stacked.values()), [stacked[name] for name in FUSION_NO_DECAY], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(config.lr_schedule, config.epochs))
    histories: list[list[float]] = [[] for _ in heads]
    for _ in range(config.epochs):
        logits = fusion_logits(stacked, inputs)[0]
        losses = [medfocus_loss(logits[index, rows], labels[rows], config.lambda_)[0] for index, rows in enumerate(row_sets)]
        optimiser.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        optimiser.step()
        scheduler.step()
        for history, loss in zip(histories, losses):
            history.append(float(loss.detach()))
    infos = []
    with torch.no_grad():
        for index, (head, rows) in enumerate(zip(heads, row_sets)):
            for name in FUSION_PARAMETERS:
                getattr(head, name).copy_(stacked[name][index])
            _, components = medfocus_loss(head(inputs.take(rows)), labels[rows], config.lambda_)
            infos.append({"loss_history": histories[index], "final_loss_components": components})
    return infos


# --- medfocus_dual -------------------------------------------------------------------------------------------------


def _whole_image_only(config: TrainConfig) -> TrainConfig:
    """The fusion head's settings with the ROI bias fixed at 0: the ROI weights change nothing, as in mode ``none``."""
    return config.model_copy(update={"roi_bias_strength": 0.0, "learn_roi_bias": False})


def _roi_branch(inputs: HeadInputs, labels: Tensor, text: ClassText, config: TrainConfig,
                generator: torch.Generator) -> tuple[CosineClassifierHead, dict]:
    """The ROI branch: the few-shot CLIP head of the ROI view."""
    roi_inputs = inputs.swap_views()
    return _train_cosine_head(roi_inputs, labels, _class_init(text, roi_inputs.image, labels)[0], config, generator)


def _train_branches(inputs: HeadInputs, labels: Tensor, row_sets: list[Tensor], text: ClassText, config: TrainConfig,
                    seed: int, generator: torch.Generator) -> list[tuple[FusionHead, CosineClassifierHead, dict]]:
    """The whole-image branch (the fusion head without ROI bias) and the ROI branch trained on each of ``row_sets``
    (rows of the subset), in order.

    When every row set fits in one batch the whole-image heads train stacked (``_train_fusion_heads_stacked``). Full-batch
    training draws nothing from the generator, so their initial weights are drawn in the same order as one by one.
    """
    whole_config = _whole_image_only(config)
    if max(len(rows) for rows in row_sets) > config.batch_size:
        branches = []
        for rows in row_sets:
            part, part_labels = inputs.take(rows), labels[rows]
            whole_init = _class_init(text, part.image, part_labels)[0]
            whole, whole_info = _fit_medfocus(part, part_labels, whole_init, whole_config, seed, generator)
            roi, roi_info = _roi_branch(part, part_labels, text, config, generator)
            branches.append((whole, roi, {"whole": whole_info, "roi": roi_info}))
        return branches
    wholes = [_new_fusion_head(_class_init(text, inputs.image[rows], labels[rows])[0], inputs.patches[rows], labels[rows],
                               whole_config, generator) for rows in row_sets]
    trainings = _train_fusion_heads_stacked(wholes, inputs, labels, row_sets, whole_config)
    branches = []
    for rows, whole, training in zip(row_sets, wholes, trainings):
        roi, roi_info = _roi_branch(inputs.take(rows), labels[rows], text, config, generator)
        branches.append((whole, roi, {"whole": _fusion_fit_info(whole, whole_config, training), "roi": roi_info}))
    return branches


def _rows_outside(held_out: Tensor, samples: int) -> Tensor:
    keep = torch.ones(samples, dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten()


def _out_of_fold_logits(inputs: HeadInputs, folds: list[Tensor], branches: list[tuple[FusionHead, CosineClassifierHead, dict]],
                        num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of both branches for every training image from the branches of the fold that held it out, and the gate
    feature."""
    samples = len(inputs.image)
    whole_logits, roi_logits, feature = torch.empty(samples, num_classes), torch.empty(samples, num_classes), torch.empty(samples)
    for held_out, (whole, roi, _) in zip(folds, branches):
        held_inputs = inputs.take(held_out)
        with torch.no_grad():
            whole_logits[held_out] = whole(held_inputs)
            roi_logits[held_out] = roi(held_inputs.swap_views())
            feature[held_out] = DualViewHead.gate_feature(whole_logits[held_out], roi_logits[held_out],
                                                          whole.logit_scale(), roi.logit_scale())
    return whole_logits, roi_logits, feature


def _fit_gate(whole_logits: Tensor, roi_logits: Tensor, feature: Tensor, has_roi: Tensor, labels: Tensor,
              l2: float) -> tuple[float, float, float]:
    """(bias, slope, feature scale) of γ = sigmoid(bias + slope · feature / scale) minimising the cross-entropy of the
    blended out-of-fold logits + l2 · slope². Images without an ROI keep γ = 0 and do not move the gate.

    The blended logits get a free temperature during this fit: few-shot heads are overconfident out of fold, and
    without it the cheapest way to soften them is to mix in the other branch, which would let an ROI view that holds
    nothing buy itself weight by blurring the whole-image logits.
    """
    with_roi = feature[has_roi]
    scale = float(with_roi.std()) if len(with_roi) > 1 and float(with_roi.std()) > 1e-6 else 1.0
    bias = torch.zeros((), requires_grad=True)
    slope = torch.zeros((), requires_grad=True)
    log_temperature = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([bias, slope, log_temperature], lr=1.0, max_iter=200, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        gamma = torch.where(has_roi, torch.sigmoid(bias + slope * feature / scale), torch.zeros_like(feature))[:, None]
        blended = (1.0 - gamma) * whole_logits + gamma * roi_logits
        loss = F.cross_entropy(blended * log_temperature.exp(), labels) + l2 * slope.pow(2)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(bias.detach()), float(slope.detach()), scale


def _fit_medfocus_dual(inputs, labels, class_init, config: TrainConfig, seed, generator, text: ClassText):
    num_classes, embed_dim = class_init.shape
    head = DualViewHead(embed_dim, num_classes, 1.0 / config.temperature, config.learn_temperature,
                        heads=config.attention_heads, head_dim=config.head_dim, num_patches=inputs.patches.shape[1],
                        token_dim=inputs.patches.shape[2])
    smallest = int(torch.unique(labels, return_counts=True)[1].min())
    folds = (stratified_folds(labels, min(config.dual_folds, smallest), seed) if smallest >= 2 else
             f"subset too small for out-of-fold gate fitting: a class has {smallest} < 2 images")
    info: dict[str, Any] = {}
    gate_from_folds = bool(inputs.has_roi.any()) and not isinstance(folds, str)
    row_sets = [_rows_outside(held_out, len(labels)) for held_out in folds] if gate_from_folds else []
    branches = _train_branches(inputs, labels, row_sets + [torch.arange(len(labels))], text, config, seed, generator)
    whole, roi, branch_info = branches[-1]
    if not bool(inputs.has_roi.any()):
        bias, slope, scale = float("-inf"), 0.0, 1.0
        source = "whole image only: no training image has an ROI"
    elif isinstance(folds, str):
        default = config.dual_gate_default
        bias = math.log(default / (1.0 - default)) if 0.0 < default < 1.0 else (float("-inf") if default == 0.0 else float("inf"))
        slope, scale = 0.0, 1.0
        source = f"fixed default gate {default} ({folds})"
    else:
        whole_logits, roi_logits, feature = _out_of_fold_logits(inputs, folds, branches[:-1], num_classes)
        bias, slope, scale = _fit_gate(whole_logits, roi_logits, feature, inputs.has_roi, labels, config.dual_gate_l2)
        gamma = torch.where(inputs.has_roi, torch.sigmoid(bias + slope * feature / scale), torch.zeros_like(feature))
        blended = (1.0 - gamma[:, None]) * whole_logits + gamma[:, None] * roi_logits
        info["out_of_fold"] = {
            "folds": len(folds),
            "accuracy": {name: float((logits.argmax(dim=1) == labels).float().mean())
                         for name, logits in (("whole", whole_logits), ("roi", roi_logits), ("blend", blended))},
            "gate_mean": float(gamma.mean()), "gate_min": float(gamma.min()), "gate_max": float(gamma.max()),
        }
        source = f"gate fitted on out-of-fold predictions of the training subset ({len(folds)} folds)"
    with torch.no_grad():
        head.whole.load_state_dict(whole.state_dict())
        head.roi.load_state_dict(roi.state_dict())
        head.gate_bias.fill_(bias)
        head.gate_slope.fill_(slope)
        head.margin_scale.fill_(scale)
        final_gate = head.gate(inputs)
    hyperparameters = {"lambda": config.lambda_, "epochs": config.epochs, "lr": config.lr,
                       "gate_bias": bias, "gate_slope": slope, "margin_scale": scale}
    info["train_gate_mean"] = float(final_gate.mean())
    info["loss_history"] = {name: branch["loss_history"] for name, branch in branch_info.items()}
    return head, {"hyperparameters": hyperparameters, "hyperparameter_source": source, **info}


# --- medfocus_select -----------------------------------------------------------------------------------------------


def _fit_select_candidate(name: str, inputs: HeadInputs, labels: Tensor, text: ClassText, config: TrainConfig,
                          seed: int) -> tuple[nn.Module, dict]:
    """One candidate of medfocus_select on ``inputs``, with its own generator (the same seed whatever ran before)."""
    generator = torch.Generator().manual_seed(seed)
    class_init = _class_init(text, inputs.image, labels)[0]
    if name == "fusion_whole":
        return _fit_medfocus(inputs, labels, class_init, _whole_image_only(config), seed, generator)
    if name == "fusion_roi":
        return _fit_medfocus(inputs, labels, class_init, config, seed, generator)
    return _fit_medfocus_dual(inputs, labels, class_init, config, seed, generator, text=text)


def _fit_medfocus_select(inputs, labels, class_init, config: TrainConfig, seed, generator, text: ClassText):
    split = validation_split(labels, config.val_fraction, config.val_min_per_class, seed)
    scores: dict[str, dict] = {}
    if isinstance(split, str):
        chosen = config.select_default
    else:
        fit_idx, val_idx = split
        best = None
        for name in SELECT_CANDIDATES:
            head, _ = _fit_select_candidate(name, inputs.take(fit_idx), labels[fit_idx], text, config, seed)
            with torch.no_grad():
                score = _selection_score(head(inputs.take(val_idx)), labels[val_idx])
            scores[name] = {"val_accuracy": score[0], "val_nll": score[1]}
            if _better(score, best):
                best, chosen = score, name
    head, info = _fit_select_candidate(chosen, inputs, labels, text, config, seed)
    return head, {"hyperparameters": {"candidate": chosen, **info["hyperparameters"]}, **_split_info(split),
                  "validation_scores": scores, "candidate_fit": {k: v for k, v in info.items() if k != "hyperparameters"}}


_FITTERS = {
    "zero_shot": _fit_zero_shot,
    "linear_probe": _fit_linear_probe,
    "tip_adapter": _fit_tip_adapter,
    "tip_adapter_f": _fit_tip_adapter_f,
    "clip_fewshot": _fit_clip_fewshot,
    "medfocus": _fit_medfocus,
    "medfocus_dual": _fit_medfocus_dual,
    "medfocus_select": _fit_medfocus_select,
}
