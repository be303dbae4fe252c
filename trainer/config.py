"""Trainer settings: one pydantic model, imported as-is into the ``train:`` section of params.yaml.

Every field has a default and a description, so ``TrainConfig()`` is a complete, documented configuration and a saved
head can be rebuilt from ``config.model_dump(by_alias=True)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _positive_sorted(values: list[float], name: str) -> list[float]:
    if not values:
        raise ValueError(f"{name} must list at least one value")
    for value in values:
        if value <= 0:
            raise ValueError(f"every {name} value must be > 0, got {value}")
    return sorted(set(values))


# The trainer's methods by name (settings validation reads these without importing torch).
METHODS = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "clip_fewshot", "medfocus", "medfocus_dual",
           "medfocus_select")
TEXT_FREE_METHODS = tuple(method for method in METHODS if method != "zero_shot")
ROI_VIEW_METHODS = ("medfocus_dual", "medfocus_select")  # need FeatureSet.roi_global (feature stores of mode "dual")
PATCH_METHODS = ("medfocus", "medfocus_dual", "medfocus_select")  # need the patch tokens
# medfocus_select's candidates, in order of preference on an exact tie (the whole image first: it never needs an ROI).
SELECT_CANDIDATES = ("fusion_whole", "fusion_roi", "dual_view")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # Loss of the trained heads (medfocus, clip_fewshot).
    lambda_: float = Field(
        default=0.5, alias="lambda", ge=0.0, le=1.0,
        description="Loss mix λ·L_c + (1−λ)·L_e: L_c the CLIP-style contrastive term, L_e cross-entropy. 0 = pure cross-entropy.",
    )
    temperature: float = Field(
        default=0.01, gt=0.0, le=1.0,
        description="Initial softmax temperature of the cosine logits (logit scale = 1/temperature; CLIP's is 0.01).",
    )
    learn_temperature: bool = Field(default=False, description="Learn the logit scale (capped at 100, as in CLIP) instead of keeping it fixed.")

    # Optimisation of the trained heads.
    epochs: int = Field(default=100, ge=1, description="Passes over the training subset (medfocus, clip_fewshot).")
    lr: float = Field(default=2e-3, gt=0.0, description="AdamW learning rate (medfocus, clip_fewshot).")
    weight_decay: float = Field(default=1e-2, ge=0.0, description="AdamW weight decay on projection matrices (not on class embeddings, ROI bias or logit scale).")
    batch_size: int = Field(default=256, ge=1, description="Mini-batch size; a subset this small or smaller trains full-batch.")
    lr_schedule: Literal["cosine", "constant"] = Field(default="cosine", description="'cosine' (decay to 0 over all steps) or 'constant'.")

    # Fusion head (medfocus).
    attention_heads: int = Field(default=4, ge=1, description="Heads of the class-query cross-attention over patch tokens.")
    head_dim: int = Field(default=64, ge=1, description="Query/key/value width per head.")
    roi_bias_strength: float = Field(
        default=4.0, ge=0.0,
        description="Initial attention bias per unit ROI weight: a patch fully inside the ROI gets exp(strength)× the weight of one outside.",
    )
    learn_roi_bias: bool = Field(default=True, description="Learn the ROI bias strength per head (initialised at roi_bias_strength).")

    # Dual-view head (medfocus_dual): the gate between the whole-image and the ROI branch is fitted on out-of-fold predictions.
    dual_folds: int = Field(
        default=5, ge=2,
        description="medfocus_dual: folds of the out-of-fold predictions its gate is fitted on (fewer when the smallest class has fewer images).",
    )
    dual_gate_l2: float = Field(
        default=0.1, ge=0.0,
        description="medfocus_dual: L2 penalty on the gate's per-image slope (0 lets the per-image term grow freely; the gate bias is not penalised).",
    )
    dual_gate_default: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="medfocus_dual: weight of the ROI branch when some class has < 2 training images (no folds to fit the gate on); 0 = whole image only.",
    )

    # medfocus_select: which ROI setting, chosen on the validation part (val_fraction below).
    select_default: Literal["fusion_whole", "fusion_roi", "dual_view"] = Field(
        default="dual_view",
        description="medfocus_select: the candidate used when the subset is too small for a validation split (dual_view "
        "falls back to the whole image by itself when its out-of-fold gate finds no use for the ROI).",
    )

    # Hyperparameter choice of the baselines: on a validation part of the training subset, never on the test set.
    val_fraction: float = Field(default=0.25, gt=0.0, lt=1.0, description="Share of each class held out of the training subset to choose baseline hyperparameters.")
    val_min_per_class: int = Field(
        default=4, ge=2,
        description="Below this many training images in any class there is no validation split: baselines use their fixed defaults (recorded).",
    )
    zero_shot_logit_scale: float = Field(default=100.0, gt=0.0, description="CLIP's logit scale for zero-shot logits (zero_shot and the Tip-Adapter zero-shot term).")
    linear_probe_c_grid: list[float] = Field(
        default=[0.1, 1.0, 10.0, 100.0, 1000.0],
        description="Inverse L2 strength C of the logistic-regression probe (scikit-learn convention) tried on the validation part.",
    )
    linear_probe_c_default: float = Field(default=10.0, gt=0.0, description="C used when the subset is too small for a validation split.")
    linear_probe_max_iter: int = Field(default=200, ge=1, description="L-BFGS iterations of the logistic-regression probe.")
    tip_alpha_grid: list[float] = Field(
        default=[0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
        description="Tip-Adapter residual ratio α (cache-logit weight) tried on the validation part.",
    )
    tip_beta_grid: list[float] = Field(
        default=[0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0],
        description="Tip-Adapter sharpness β of the cache affinity exp(−β(1−cos)) tried on the validation part.",
    )
    tip_alpha_default: float = Field(default=1.0, gt=0.0, description="α without a validation split (Zhang et al. 2022).")
    tip_beta_default: float = Field(default=5.5, gt=0.0, description="β without a validation split (Zhang et al. 2022).")
    tip_f_epochs: int = Field(default=20, ge=1, description="Tip-Adapter-F epochs of cache-key fine-tuning (the paper's 20).")
    tip_f_lr: float = Field(default=1e-3, gt=0.0, description="Tip-Adapter-F AdamW learning rate (the paper's 0.001).")

    @field_validator("linear_probe_c_grid")
    @classmethod
    def _c_grid(cls, values: list[float]) -> list[float]:
        return _positive_sorted(values, "linear_probe_c_grid")

    @field_validator("tip_alpha_grid")
    @classmethod
    def _alpha_grid(cls, values: list[float]) -> list[float]:
        return _positive_sorted(values, "tip_alpha_grid")

    @field_validator("tip_beta_grid")
    @classmethod
    def _beta_grid(cls, values: list[float]) -> list[float]:
        return _positive_sorted(values, "tip_beta_grid")
