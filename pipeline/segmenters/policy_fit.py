"""Fitting an ROI policy on ground truth (masks or boxes): the implementation of ``medfocus roi-fit``.

A fitted policy keeps the proposals, decoding, refinement and area range of the policy it starts from
(``--start-from``, a built-in name or a policy file) and gets new score weights:

1. Split (:func:`holdout_split`): the images go to a *tune* part or a *held-out* part by a fixed, documented rule, by
   group, so that neighbouring slices of one patient do not fall on both sides. A group is an image
   (``group_by="file"``), a block of ``B`` consecutive file numbers in one folder (``"number:B"``: the last number in
   the file's name, integer-divided by B), or what a regular expression captures in the image's path relative to the
   dataset root (``"regex:PATTERN"``: its first group, else the whole match). Each group is held out when a draw from
   sha256(seed, group) falls below ``holdout_fraction``, so adding images never moves others. ``holdout_from=N``
   instead holds out every image whose file number is >= N (the demo's rule: tune on 0-19, hold out 20-39).
2. The embedding map (:func:`fit_embedding_map`), when the start policy has one without weights: a logistic regression
   on the tune images' LiteMedSAM embedding cells, lesion or not (:mod:`.embedding_map`); the start policy then has
   the fitted map, and its masks are among the candidates below.
3. Candidates (:func:`collect_pools`): the start policy's proposals are decoded on every image with a lesion, each
   first-round mask and the refinement of each is measured against the ground truth: Dice against the mask where masks
   are given (the fitting target then), box IoU of its bounding box against the ground-truth box (the target with boxes
   only) and whether it covers half of that box. Images without a lesion are counted and left out.
4. Weights (:func:`fit_weights`): the linear weights over ``FEATURE_NAMES`` maximising the mean softmax-weighted target
   of the chosen mask per tune image (a listwise ranking objective: temperature 0.1, L2 1e-3, 400 Adam steps, features
   standardised while fitting and folded back into raw-feature weights); :func:`cross_validate` gives the k-fold
   estimate on the tune part.
5. Held-out scores, once: the fitted policy's choice is simulated on the held-out images' candidates (the steps of
   :func:`selection.select`, one refinement round at most), next to the start policy's and the whole-image box's.

Ground truth is used here only; a policy at run time sees features, never masks or boxes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.pipeline.images import load_image
from medfocus.pipeline.medsam_lite import INPUT_SIZE
from medfocus.pipeline.segmenters import selection
from medfocus.pipeline.segmenters.embedding_map import cell_targets, fit_scorer, image_cells
from medfocus.pipeline.segmenters.base import WORK_SIZE, Candidate
from medfocus.pipeline.segmenters.policies import (
    FEATURE_NAMES,
    FitProvenance,
    FitSplit,
    HeldOutScores,
    PolicyFile,
    RoiInputError,
    RoiPolicy,
    parse_policy_file,
    policy_file_from,
)
from medfocus.pipeline.segmenters.roi_eval import GroundTruth, box_iou, box_scores, dice_iou, load_truth_mask
from medfocus.pipeline.segmenters.selection import FEATURE_SIZE, grayscale_work_image, mask_box, mask_features

FIT_OPTIONS = {"temperature": 0.1, "l2": 1e-3, "steps": 400}
WHOLE_IMAGE: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass
class CandidatePool:
    """Every first-round candidate of one image, plus the refinement of each, with their scores against the truth."""

    image: str
    class_name: str
    gray: np.ndarray
    first: list[Candidate]
    first_scores: np.ndarray  # the fitting target of each first-round candidate (Dice with masks, else box IoU)
    refined: list[Candidate]
    refined_scores: np.ndarray
    refined_parents: list[set[int]]  # indices into ``first`` whose refinement box produced each refined mask
    first_metrics: list[dict] = field(default_factory=list)  # every measure of each candidate: dice, box_iou, box_hit
    refined_metrics: list[dict] = field(default_factory=list)
    truth_box: tuple[float, float, float, float] | None = None


def _compact(candidate: Candidate) -> Candidate:
    """Keep logits at the feature resolution only: features are measured there, and pools stay small."""
    small = F.interpolate(candidate.logits[None, None], size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                          align_corners=False)[0, 0]
    return dataclasses.replace(candidate, logits=small.half(), features=dict(candidate.features))


def _measure(candidate: Candidate, mask: np.ndarray | None, truth_box) -> dict[str, float]:
    roi = candidate.mask.numpy()
    metrics = box_scores(roi, truth_box)
    if mask is not None:
        if roi.shape != mask.shape:
            raise ValueError("candidate and truth must share the work frame")
        metrics["dice"] = dice_iou(roi, mask)[0]
    return metrics


def collect_pools(
    segmenter,
    policy: RoiPolicy,
    items: list[tuple[Path, str]],
    images_root: Path,
    truth: GroundTruth,
    refine: bool = True,
    progress: bool = False,
    no_lesion: list | None = None,
) -> list[CandidatePool]:
    """Decode ``policy``'s proposals on every image with a lesion with ``segmenter.embed`` (either backend) and measure
    each mask against the ground truth in the work frame. With ``refine``, every distinct refinement box of a
    first-round mask is decoded too, so any ``refine_top`` can be simulated afterwards. Images without a lesion are
    appended to ``no_lesion`` (when given) and get no pool."""
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="candidates", unit="img")
    target = "dice" if truth.masks_root is not None else "box_iou"
    pools = []
    for image_path, class_name in iterator:
        image_path = Path(image_path)
        mask_path = truth.mask_path(image_path, Path(images_root))
        image = load_image(image_path)
        mask = load_truth_mask(mask_path, WORK_SIZE) if mask_path is not None else None
        truth_box, _ = truth.truth_box(image_path, Path(images_root), image.shape[:2], mask)
        if truth_box is None:
            if no_lesion is not None:
                no_lesion.append((image_path, class_name))
            continue
        gray = grayscale_work_image(image)
        decoder = segmenter.embed(image)
        first = selection.decode(policy, decoder, selection.proposals(policy, gray, decoder))
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
        first_metrics = [_measure(c, mask, truth_box) for c in first]
        refined_metrics = [_measure(c, mask, truth_box) for c in refined]
        pools.append(
            CandidatePool(
                image=str(image_path),
                class_name=class_name,
                gray=gray,
                first=[_compact(c) for c in first],
                first_scores=np.array([m[target] for m in first_metrics]),
                refined=[_compact(c) for c in refined],
                refined_scores=np.array([m[target] for m in refined_metrics]),
                refined_parents=refined_parents,
                first_metrics=first_metrics,
                refined_metrics=refined_metrics,
                truth_box=truth_box,
            )
        )
    return pools


def fit_embedding_map(segmenter, policy: RoiPolicy, items: list[tuple[Path, str]], images_root: Path, truth: GroundTruth,
                      progress: bool = False) -> RoiPolicy:
    """``policy`` with its embedding map's scorer fitted on the images of ``items`` that have a lesion (step 2)."""
    description = segmenter.describe()
    if description.get("backend") != "litemedsam":
        raise RoiInputError(f"policy {policy.name!r} has an embedding map, which reads LiteMedSAM's image embedding; "
                            f"roi-fit runs the {description.get('backend')} backend: use --backend litemedsam")
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="embedding map", unit="img")
    cells, targets = [], []
    for image_path, _ in iterator:
        image = load_image(image_path)
        mask_path = truth.mask_path(Path(image_path), Path(images_root))
        mask = load_truth_mask(mask_path, WORK_SIZE) if mask_path is not None else None
        truth_box, _ = truth.truth_box(Path(image_path), Path(images_root), image.shape[:2], mask)
        if truth_box is None:
            continue
        embedded = segmenter.embed(image)
        grid = image_cells(embedded.embedding, embedded.resized_hw, INPUT_SIZE)
        cells.append(grid)
        targets.append(cell_targets(truth_box, grid.shape[0], grid.shape[1]))
    if len(cells) < 2:
        raise RoiInputError(f"the tune part has {len(cells)} image(s) with a lesion; the embedding map needs at least 2")
    try:
        weights, bias = fit_scorer(cells, targets)
    except ValueError as error:
        raise RoiInputError(str(error)) from None
    return dataclasses.replace(policy, map_weights=tuple(weights), map_bias=bias,
                               map_segmenter_sha256=str(description["checkpoint_sha256"]))


def _feature_matrix(features: list[dict], names: tuple[str, ...]) -> np.ndarray:
    return np.array([[row.get(name, 0.0) for name in names] for row in features], dtype=np.float32)


def _eligible(features: list[dict], policy: RoiPolicy) -> np.ndarray:
    return np.array([policy.min_area <= row["area"] <= policy.max_area for row in features])


def fit_weights(
    pools: list[CandidatePool],
    policy: RoiPolicy,
    names: tuple[str, ...] = FEATURE_NAMES,
    temperature: float = FIT_OPTIONS["temperature"],
    l2: float = FIT_OPTIONS["l2"],
    steps: int = FIT_OPTIONS["steps"],
) -> dict[str, float]:
    """Raw-feature weights maximising the mean softmax-weighted score of the first-round candidates.
    Features constant over the pools (say ``refined`` when nothing was refined) get no weight."""
    rows, targets, groups = [], [], []
    for group, pool in enumerate(pools):
        features = mask_features([c.float_copy() for c in pool.first], pool.gray)
        eligible = _eligible(features, policy)
        if not eligible.any():
            continue
        rows.append(_feature_matrix(features, names)[eligible])
        targets.append(pool.first_scores[eligible])
        groups.append(np.full(int(eligible.sum()), group))
    if not rows:
        raise RoiInputError("no candidate mask of any tune image lies in the policy's area range: nothing to fit")
    x = torch.from_numpy(np.concatenate(rows))
    y = torch.from_numpy(np.concatenate(targets)).float()
    _, inverse = torch.unique(torch.from_numpy(np.concatenate(groups)), return_inverse=True)
    count = int(inverse.max()) + 1
    varying = x.std(0) > 1e-6
    names = tuple(name for name, keep in zip(names, varying.tolist()) if keep)
    if not names:
        raise RoiInputError("every feature is constant over the tune candidates: nothing to fit")
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


def _choice(pool: CandidatePool, policy: RoiPolicy) -> tuple[str, int] | None:
    """Which stored candidate ``policy`` would choose: the steps of ``selection.select`` on the pool's masks (one
    refinement round at most, the one the pools were collected for); None when no mask is eligible."""
    first = [c.float_copy() for c in pool.first]
    where = {id(c): ("first", i) for i, c in enumerate(first)}
    ranked, roi_index = selection.choose(policy, first, pool.gray)
    if roi_index is None:
        return None
    if policy.refine_steps == 0 or not pool.refined:
        return where[id(ranked[roi_index])]
    parents = {where[id(c)][1] for c in ranked[: policy.refine_top] if math.isfinite(c.policy_score)}
    refined = []
    for index, (candidate, candidate_parents) in enumerate(zip(pool.refined, pool.refined_parents)):
        if candidate_parents & parents:
            copy = candidate.float_copy()
            where[id(copy)] = ("refined", index)
            refined.append(copy)
    final, final_index = selection.choose(policy, ranked + refined, pool.gray)
    return where[id(final[final_index])] if final_index is not None else None


def simulate_choice(pool: CandidatePool, policy: RoiPolicy) -> float:
    """The score (fitting target) of the ROI ``policy`` would choose on this pool; 0 when it chooses none."""
    choice = _choice(pool, policy)
    if choice is None:
        return 0.0
    which, index = choice
    return float((pool.first_scores if which == "first" else pool.refined_scores)[index])


def simulated_metrics(pool: CandidatePool, policy: RoiPolicy) -> dict[str, float]:
    """Every measure (dice, box_iou, box_hit) of the ROI ``policy`` would choose; zeros when it chooses none."""
    choice = _choice(pool, policy)
    if choice is None:
        return {name: 0.0 for name in (pool.first_metrics[0] if pool.first_metrics else {})}
    which, index = choice
    return dict((pool.first_metrics if which == "first" else pool.refined_metrics)[index])


def cross_validate(pools: list[CandidatePool], policy: RoiPolicy, folds: int = 5, seed: int = 0, **fit_options) -> dict:
    """k-fold estimate on the tune pools: fit on k-1 folds, simulate the choice on the held-out fold."""
    order = np.random.default_rng(seed).permutation(len(pools))
    scores = np.zeros(len(pools))
    for held_out in np.array_split(order, folds):
        held = set(held_out.tolist())
        weights = fit_weights([p for i, p in enumerate(pools) if i not in held], policy, **fit_options)
        fitted = dataclasses.replace(policy, weights=weights)
        for index in held_out:
            scores[index] = simulate_choice(pools[index], fitted)
    oracle = [max(p.first_scores.max(initial=0.0), p.refined_scores.max(initial=0.0)) for p in pools]
    return {"cv_score": float(scores.mean()), "oracle_score": float(np.mean(oracle)), "per_image": scores.tolist()}


# --- the tune / held-out split ----------------------------------------------------------------------------------------


def _file_number(path: Path) -> int:
    match = re.search(r"(\d+)(?!.*\d)", path.stem)
    if match is None:
        raise RoiInputError(f"{path.name}: no number in the file name (--group-by number:B and --holdout-from need one)")
    return int(match.group(1))


def _group_of(relative: Path, group_by: str) -> str:
    if group_by == "file":
        return relative.with_suffix("").as_posix()
    kind, _, argument = group_by.partition(":")
    if kind == "number":
        return f"{relative.parent.as_posix()}/{_file_number(relative) // int(argument)}"
    match = re.search(argument, relative.as_posix())
    if match is None:
        raise RoiInputError(f"--group-by {group_by!r} does not match {relative.as_posix()!r}")
    return match.group(1) if match.groups() else match.group(0)


def check_group_by(group_by: str) -> str:
    kind, _, argument = group_by.partition(":")
    if group_by == "file" or (kind == "number" and argument.isdigit() and int(argument) >= 1):
        return group_by
    if kind == "regex" and argument:
        try:
            re.compile(argument)
        except re.error as error:
            raise RoiInputError(f"--group-by {group_by!r}: not a regular expression ({error})") from None
        return group_by
    raise RoiInputError(f"--group-by must be 'file', 'number:B' (B >= 1) or 'regex:PATTERN', got {group_by!r}")


def _draw(seed: int, group: str) -> float:
    digest = hashlib.sha256(f"roi-fit\0{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def holdout_split(items: list[tuple[Path, str]], images_root: Path, group_by: str = "file", holdout_fraction: float = 0.3,
                  holdout_from: int | None = None, seed: int = 0) -> tuple[list, list, FitSplit]:
    """(tune, held-out, the rule as data): see the module's docstring, step 1."""
    check_group_by(group_by)
    tune, held = [], []
    for item in items:
        relative = Path(item[0]).relative_to(images_root)
        if holdout_from is not None:
            is_held = _file_number(relative) >= holdout_from
        else:
            is_held = _draw(seed, _group_of(relative, group_by)) < holdout_fraction
        (held if is_held else tune).append(item)
    if holdout_from is not None:
        rule = f"held out: images whose file number is >= {holdout_from}; tune: the rest"
    else:
        unit = {"file": "each image", "number": f"blocks of {group_by.partition(':')[2]} consecutive file numbers per folder",
                "regex": f"the groups {group_by.partition(':')[2]!r} captures in the relative path"}[group_by.partition(":")[0]]
        rule = (f"groups ({unit}) held out when their draw in [0, 1) from sha256(seed {seed}, group) is below "
                f"{holdout_fraction}; tune: the rest")
    split = FitSplit(rule=rule, group_by=group_by, holdout_fraction=None if holdout_from is not None else holdout_fraction,
                     holdout_from=holdout_from, seed=seed)
    return tune, held, split


# --- roi-fit -----------------------------------------------------------------------------------------------------------


def fit_segmenter(build_options: dict):
    """The segmenter whose decoder the candidates come from (``create_segmenter``'s options; its own policy is not used:
    the pools decode the start policy's proposals)."""
    from medfocus.pipeline.segmenters.factory import create_segmenter

    return create_segmenter(**build_options)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _medfocus_version() -> str:
    try:
        return metadata.version("medfocus")
    except metadata.PackageNotFoundError:
        return "unknown"


def fit_policy(segmenter, start: RoiPolicy, items: list[tuple[Path, str]], images_root: Path, truth: GroundTruth, *,
               name: str, dataset: str, split_options: dict, started_from: str, command: str | None = None,
               progress: bool = False) -> PolicyFile:
    """Split, fit the weights on the tune part, measure once on the held-out part; the policy file (not yet written)."""
    if start.refine_steps > 1:
        raise RoiInputError(f"policy {start.name!r} refines {start.refine_steps} times; fitting simulates one refinement "
                         "round at most: start from a policy with refinement.steps <= 1")
    images_root = Path(images_root)
    tune_items, held_items, split = holdout_split(items, images_root, **split_options)
    tune_empty: list = []
    held_empty: list = []
    map_fitted = start.has_map and not start.map_weights
    if map_fitted:
        start = fit_embedding_map(segmenter, start, tune_items, images_root, truth, progress=progress)
    tune = collect_pools(segmenter, start, tune_items, images_root, truth, refine=start.refine_steps > 0,
                         progress=progress, no_lesion=tune_empty)
    if len(tune) < 2:
        raise RoiInputError(f"the tune part has {len(tune)} image(s) with a lesion; fitting needs at least 2 "
                         f"({len(tune_items)} tune and {len(held_items)} held-out images: {split.rule})")
    held = collect_pools(segmenter, start, held_items, images_root, truth, refine=start.refine_steps > 0,
                         progress=progress, no_lesion=held_empty)
    if not held:
        raise RoiInputError(f"the held-out part has no image with a lesion ({len(held_items)} held-out images: {split.rule}); "
                         "hold out more (--holdout-fraction, --holdout-from, --split-seed)")
    weights = fit_weights(tune, start, **FIT_OPTIONS)
    cv = cross_validate(tune, start, folds=min(5, len(tune)), **FIT_OPTIONS)
    objective = "dice" if truth.masks_root is not None else "box_iou"
    fitted = dataclasses.replace(
        start, name=name, weights=weights,
        summary=f"{start.summary}; {'embedding map and ' if map_fitted else ''}score weights fitted by medfocus roi-fit "
                f"on {dataset} ({len(tune)} tune images with a lesion, {truth.kind})")
    chosen = [simulated_metrics(pool, fitted) for pool in held]
    before = [simulated_metrics(pool, start) for pool in held]
    held_out = HeldOutScores(
        n=len(held), box_iou=_mean([m["box_iou"] for m in chosen]), hit_rate=_mean([m["box_hit"] for m in chosen]),
        dice=_mean([m["dice"] for m in chosen]) if objective == "dice" else None,
        start_policy_box_iou=_mean([m["box_iou"] for m in before]),
        start_policy_dice=_mean([m["dice"] for m in before]) if objective == "dice" else None,
        whole_image_box_iou=_mean([box_iou(WHOLE_IMAGE, pool.truth_box) for pool in held]),
        no_lesion_images=len(held_empty))
    ground_truth = {"kind": truth.kind, "path": str(truth.boxes if truth.boxes is not None else truth.masks_root)}
    if truth.kind == "masks":
        ground_truth["mask_suffix"] = truth.mask_suffix
    provenance = FitProvenance(
        dataset=dataset, images_root=str(images_root), ground_truth=ground_truth, split=split,
        counts={"images": len(items), "tune": len(tune_items), "held_out": len(held_items), "tune_lesion": len(tune),
                "held_out_lesion": len(held), "tune_no_lesion": len(tune_empty), "held_out_no_lesion": len(held_empty)},
        started_from=started_from, objective=f"{objective} of the chosen mask (softmax-weighted, {FIT_OPTIONS})",
        backend=segmenter.describe().get("backend", "unknown"),
        weights_sha256=str(segmenter.describe().get("checkpoint_sha256", "unknown")), tune_cv_score=cv["cv_score"],
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), medfocus_version=_medfocus_version(),
        command=command)
    return policy_file_from(fitted, provenance, held_out)


def write_policy_file(path: str | Path, policy_file: PolicyFile) -> Path:
    """Write a policy file atomically, after reading its own text back through the validator."""
    path = Path(path)
    text = policy_file.dump()
    parse_policy_file(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path
