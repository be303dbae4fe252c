"""Setting an ROI policy's score weights from ground truth on a *tune* split, reproducibly.

The weights of a learned policy (see ``policies.POLICIES``) are not hand-picked: ``collect_pools`` runs the
policy's own proposals through a backend on the tune images and records every candidate mask with its Dice
against the ground truth; ``fit_weights`` then finds the linear weights over ``FEATURE_NAMES`` that maximise
the softmax-weighted Dice of the chosen mask per image (a listwise ranking objective: temperature 0.1,
L2 1e-3, 400 Adam steps, features standardised while fitting and folded back into raw-feature weights).
``cross_validate`` gives the k-fold estimate on the tune split itself. Ground truth is used here only;
a policy at run time sees features, never masks. Entry point: ``benchmarks/roi_quality.py --fit-weights``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.pipeline.images import load_image
from medfocus.pipeline.segmenters.base import Candidate
from medfocus.pipeline.segmenters import selection
from medfocus.pipeline.segmenters.policies import FEATURE_NAMES, RoiPolicy
from medfocus.pipeline.segmenters.selection import FEATURE_SIZE, grayscale_work_image, mask_box, mask_features
from medfocus.pipeline.segmenters.roi_eval import dice_iou, load_truth_mask, mask_path_for


@dataclass
class CandidatePool:
    """Every first-round candidate of one image, plus the refinement of each, with their Dice."""

    image: str
    class_name: str
    gray: np.ndarray
    first: list[Candidate]
    first_dice: np.ndarray
    refined: list[Candidate]
    refined_dice: np.ndarray
    refined_parents: list[set[int]]  # indices into ``first`` whose refinement box produced each refined mask


def _compact(candidate: Candidate) -> Candidate:
    """Keep logits at the feature resolution only: features are measured there, and pools stay small."""
    small = F.interpolate(candidate.logits[None, None], size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                          align_corners=False)[0, 0]
    return dataclasses.replace(candidate, logits=small.half(), features=dict(candidate.features))


def _dice(candidate: Candidate, truth: np.ndarray) -> float:
    mask = candidate.mask.numpy()
    if mask.shape != truth.shape:
        raise ValueError("candidate and truth must share the work frame")
    return dice_iou(mask, truth)[0]


def collect_pools(
    segmenter,
    policy: RoiPolicy,
    items: list[tuple[Path, str]],
    images_root: Path,
    masks_root: Path,
    mask_suffix: str = "_mask.png",
    refine: bool = True,
    progress: bool = False,
) -> list[CandidatePool]:
    """Decode ``policy``'s proposals on every image with ``segmenter.embed`` (either backend) and score each mask
    against the ground truth resized (nearest) to the work frame. With ``refine``, every distinct refinement box
    of a first-round mask is decoded too, so any ``refine_top`` can be simulated afterwards."""
    from medfocus.pipeline.segmenters.base import WORK_SIZE

    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="collect", unit="img")
    pools = []
    for image_path, class_name in iterator:
        image = load_image(image_path)
        truth = load_truth_mask(mask_path_for(Path(image_path), images_root, masks_root, mask_suffix), WORK_SIZE)
        gray = grayscale_work_image(image)
        decoder = segmenter.embed(image)
        first = selection.decode(policy, decoder, selection.proposals(policy, gray))
        refined, refined_parents = [], []
        if refine:
            boxes: dict[tuple[float, ...], list[int]] = {}
            for index, candidate in enumerate(first):
                box = mask_box(candidate.mask, policy.refine_margin)
                if box is not None:
                    boxes.setdefault(tuple(round(value, 4) for value in box), []).append(index)
            for box, parents in boxes.items():
                prompt = {"refined": 1.0, "seed_rank": first[parents[0]].features.get("seed_rank", 0.0)}
                for candidate in selection.decode(policy, decoder, [("refine", list(box), prompt)]):
                    refined.append(candidate)
                    refined_parents.append(set(parents))
        pools.append(
            CandidatePool(
                image=str(image_path),
                class_name=class_name,
                gray=gray,
                first=[_compact(c) for c in first],
                first_dice=np.array([_dice(c, truth) for c in first]),
                refined=[_compact(c) for c in refined],
                refined_dice=np.array([_dice(c, truth) for c in refined]),
                refined_parents=refined_parents,
            )
        )
    return pools


def _feature_matrix(features: list[dict], names: tuple[str, ...]) -> np.ndarray:
    return np.array([[row.get(name, 0.0) for name in names] for row in features], dtype=np.float32)


def _eligible(features: list[dict], policy: RoiPolicy) -> np.ndarray:
    return np.array([policy.min_area <= row["area"] <= policy.max_area for row in features])


def fit_weights(
    pools: list[CandidatePool],
    policy: RoiPolicy,
    names: tuple[str, ...] = FEATURE_NAMES,
    temperature: float = 0.1,
    l2: float = 1e-3,
    steps: int = 400,
) -> dict[str, float]:
    """Raw-feature weights maximising the mean softmax-weighted Dice of the first-round candidates.
    Features constant over the pools (say ``refined`` when nothing was refined) get no weight."""
    rows, targets, groups = [], [], []
    for group, pool in enumerate(pools):
        features = mask_features([c.float_copy() for c in pool.first], pool.gray)
        eligible = _eligible(features, policy)
        if not eligible.any():
            continue
        rows.append(_feature_matrix(features, names)[eligible])
        targets.append(pool.first_dice[eligible])
        groups.append(np.full(int(eligible.sum()), group))
    x = torch.from_numpy(np.concatenate(rows))
    y = torch.from_numpy(np.concatenate(targets)).float()
    _, inverse = torch.unique(torch.from_numpy(np.concatenate(groups)), return_inverse=True)
    count = int(inverse.max()) + 1
    varying = x.std(0) > 1e-6
    names = tuple(name for name, keep in zip(names, varying.tolist()) if keep)
    x = x[:, varying]
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    weights = torch.zeros(len(names), requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        logits = (z @ weights) / temperature
        peak = torch.zeros(count).scatter_reduce(0, inverse, logits, reduce="amax", include_self=False)
        exp = torch.exp(logits - peak[inverse])
        share = exp / torch.zeros(count).index_add(0, inverse, exp)[inverse]
        loss = -(share * y).sum() / count + l2 * (weights**2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    raw = (weights.detach() / std).numpy()
    return {name: float(f"{value:.4g}") for name, value in zip(names, raw)}


def simulate_choice(pool: CandidatePool, policy: RoiPolicy) -> float:
    """Dice of the ROI ``policy`` would choose on this pool: the steps of ``RoiPolicy.select`` on stored masks
    (one refinement round at most, the one the pools were collected for)."""
    first = [c.float_copy() for c in pool.first]
    ranked, roi_index = selection.choose(policy, first, pool.gray)
    dice_of = {id(c): d for c, d in zip(first, pool.first_dice)}
    if roi_index is None:
        return 0.0
    if policy.refine_steps == 0 or not pool.refined:
        return float(dice_of[id(ranked[roi_index])])
    index_of = {id(c): i for i, c in enumerate(first)}
    parents = {index_of[id(c)] for c in ranked[: policy.refine_top] if math.isfinite(c.policy_score)}
    refined = [(c.float_copy(), d) for c, d, p in zip(pool.refined, pool.refined_dice, pool.refined_parents) if p & parents]
    for candidate, dice in refined:
        dice_of[id(candidate)] = dice
    final, final_index = selection.choose(policy, ranked + [c for c, _ in refined], pool.gray)
    return float(dice_of[id(final[final_index])]) if final_index is not None else 0.0


def cross_validate(pools: list[CandidatePool], policy: RoiPolicy, folds: int = 5, seed: int = 0, **fit_options) -> dict:
    """k-fold estimate on the tune pools: fit on k-1 folds, simulate the choice on the held-out fold."""
    order = np.random.default_rng(seed).permutation(len(pools))
    dices = np.zeros(len(pools))
    for held_out in np.array_split(order, folds):
        held = set(held_out.tolist())
        weights = fit_weights([p for i, p in enumerate(pools) if i not in held], policy, **fit_options)
        fitted = dataclasses.replace(policy, weights=weights)
        for index in held_out:
            dices[index] = simulate_choice(pools[index], fitted)
    oracle = [max(p.first_dice.max(initial=0.0), p.refined_dice.max(initial=0.0)) for p in pools]
    return {"cv_dice": float(dices.mean()), "oracle_dice": float(np.mean(oracle)), "per_image": dices.tolist()}
