"""Running an ROI policy (:mod:`.policies`): which box prompts to try, and which resulting mask is the ROI.

A policy never sees ground truth. It works on one encoded image through a decoder that turns box prompts
(xyxy fractions of width/height) into mask logits and predicted IoUs, plus the grayscale image itself:

1. Proposals. Boxes from up to five sources: the whole image, a central box, a grid of boxes at several
   scales, *blob boxes* from a cheap image cue (a difference of Gaussians picks regions darker, or
   brighter, than their surroundings at the policy's scales; hypoechoic lesions in ultrasound are dark blobs),
   and *embedding-map boxes*: where a fitted scorer over the segmenter's own image embedding puts the lesion
   (:mod:`.embedding_map`).
2. Decoding. Every proposal is decoded (one or three masks per box); near-duplicate masks (IoU >= 0.9) are
   merged, the merged count kept as ``votes``.
3. Scoring. Each mask gets features with no ground truth in them: the decoder's predicted IoU, stability
   (IoU of the masks at logit +1 and -1), area, how much of the image border it covers, intensity contrast
   with a ring around it, how well it fills its bounding box, agreement with the masks of the other
   prompts (mean IoU), and the distance of its centre from a prior position. The policy score is a weighted
   sum of these; masks outside [min_area, max_area] cannot be the ROI.
4. Refinement. The best ``refine_top`` masks are re-prompted with their own bounding box (grown by
   ``refine_margin``), ``refine_steps`` times; the refined masks join the candidates and are scored alike.
5. Choice. The highest-scoring mask is the ROI; every candidate is kept and returned, best first.

Entry point: :func:`run` (or :func:`select` for the ranked candidates without writing them at a store resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.pipeline.segmenters.base import WORK_SIZE, Candidate, SegmentationResult, assemble_result, stability_scores
from medfocus.pipeline.segmenters.embedding_map import map_boxes
from medfocus.pipeline.segmenters.policies import BLOB_SCALES, BLOB_SURROUND, MASK_OUTPUTS, RoiPolicy

FEATURE_SIZE = 64  # masks are compared and measured at 64² (enough for areas down to ~0.1%)
DUPLICATE_IOU = 0.9


class BoxDecoder(Protocol):
    def decode_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 4) xyxy fractions -> logits (N, 4, WORK_SIZE, WORK_SIZE), predicted IoU (N, 4): all four mask tokens."""
        ...


def grayscale_work_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (WORK_SIZE, WORK_SIZE) float32 in [0, 1], the frame the policy measures cues in."""
    gray = torch.tensor(image, dtype=torch.float32).mean(dim=2)[None, None]
    gray = F.interpolate(gray, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (gray[0, 0] / 255.0).numpy().astype(np.float32)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, H, W) tensor with reflect padding."""
    radius = max(1, int(3 * sigma))
    radius = min(radius, image.shape[-1] - 1, image.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    image = F.pad(image, (radius, radius, 0, 0), mode="reflect")
    image = F.conv2d(image, kernel.view(1, 1, 1, -1))
    image = F.pad(image, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(image, kernel.view(1, 1, -1, 1))


@dataclass(frozen=True)
class Blob:
    """A region darker (or brighter) than its surroundings: centre and scale as fractions of the image side."""

    cx: float
    cy: float
    sigma: float
    strength: float

    def box(self, half_side: float) -> list[float]:
        return [
            max(0.0, self.cx - half_side),
            max(0.0, self.cy - half_side),
            min(1.0, self.cx + half_side),
            min(1.0, self.cy + half_side),
        ]


def find_blobs(
    gray: np.ndarray,
    polarity: str,
    count: int,
    sigmas: tuple[float, ...] = BLOB_SCALES,
    surround: float = BLOB_SURROUND,
    border_margin: float = 0.05,
    depth_penalty: float = 0.1,
    foreground_erosion: float | None = None,
) -> list[Blob]:
    """The ``count`` strongest blobs darker ("dark") or brighter ("bright") than their surroundings.

    For each scale sigma (fraction of the image side) the response is blur(surround * sigma) - blur(sigma),
    sign flipped for bright blobs; its local maxima are blob centres. Centres closer than ``border_margin`` to
    the image edge are dropped (black margins and reflect padding make edges look like blobs), and the
    response is lowered by ``depth_penalty`` x (how far below mid-height the centre lies), since deep dark
    bands (acoustic shadows, chest wall) are not what an ROI should be. Strongest first; a blob whose centre
    lies within the scale of a stronger one is dropped. With ``foreground_erosion``, only centres inside the
    foreground (:func:`foreground_interior`) count: on brain MRI the skull and scalp are the brightest blobs.
    """
    if polarity not in ("dark", "bright"):
        raise ValueError(f"blob polarity must be 'dark' or 'bright', got {polarity!r}")
    image = torch.from_numpy(gray).float()[None, None]
    size = image.shape[-1]
    allowed = foreground_interior(gray, foreground_erosion) if foreground_erosion is not None else None
    found: list[Blob] = []
    for sigma in sigmas:
        sigma_px = sigma * size
        response = _gaussian_blur(image, surround * sigma_px) - _gaussian_blur(image, sigma_px)
        if polarity == "bright":
            response = -response
        window = 2 * max(1, int(round(sigma_px))) + 1
        peaks = (response == F.max_pool2d(response, window, stride=1, padding=window // 2)) & (response > 0)
        if allowed is not None:
            peaks &= allowed
        ys, xs = torch.nonzero(peaks[0, 0], as_tuple=True)
        for y, x in zip(ys.tolist(), xs.tolist()):
            cx, cy = (x + 0.5) / size, (y + 0.5) / size
            if min(cx, cy, 1 - cx, 1 - cy) < border_margin:
                continue
            strength = float(response[0, 0, y, x]) - depth_penalty * max(0.0, cy - 0.5)
            found.append(Blob(cx=cx, cy=cy, sigma=sigma, strength=strength))
    found.sort(key=lambda blob: -blob.strength)
    chosen: list[Blob] = []
    for blob in found:
        if all(abs(blob.cx - other.cx) > other.sigma or abs(blob.cy - other.cy) > other.sigma for other in chosen):
            chosen.append(blob)
        if len(chosen) == count:
            break
    return chosen


FOREGROUND_LEVEL = 0.08  # gray level (0-1) above which a smoothed pixel is foreground (MRI background is near black)


def foreground_interior(gray: np.ndarray, erosion: float) -> torch.Tensor:
    """The image's foreground (smoothed gray above FOREGROUND_LEVEL, small gaps closed) eroded by ``erosion`` x the
    image side: on a brain MRI slice, the head without its skull and scalp."""
    image = torch.from_numpy(gray).float()[None, None]
    foreground = (_gaussian_blur(image, 3.0) > FOREGROUND_LEVEL).float()
    foreground = -F.max_pool2d(-F.max_pool2d(foreground, 9, stride=1, padding=4), 9, stride=1, padding=4)
    radius = max(1, int(round(erosion * gray.shape[-1])))
    return (-F.max_pool2d(-foreground, 2 * radius + 1, stride=1, padding=radius))[0, 0] > 0.5


def grid_boxes(scales: tuple[float, ...], steps: int) -> list[tuple[str, list[float]]]:
    """Square boxes of each side in ``scales`` (fractions), centres on a steps x steps grid inside the image."""
    boxes = []
    for side in scales:
        centres = [0.5] if steps == 1 else np.linspace(side / 2, 1 - side / 2, steps).tolist()
        for cy in centres:
            for cx in centres:
                box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
                boxes.append((f"grid {side:.2f} @ ({cx:.2f}, {cy:.2f})", box))
    return boxes


def mask_box(mask: torch.Tensor, margin: float) -> list[float] | None:
    """Bounding box (fractions) of a 2-D boolean mask, grown by ``margin`` x its size on every side."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    height, width = mask.shape
    x0, x1 = cols[0].item() / width, (cols[-1].item() + 1) / width
    y0, y1 = rows[0].item() / height, (rows[-1].item() + 1) / height
    grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
    return [max(0.0, x0 - grow_x), max(0.0, y0 - grow_y), min(1.0, x1 + grow_x), min(1.0, y1 + grow_y)]


def _small_masks(candidates: list[Candidate]) -> torch.Tensor:
    logits = torch.stack([candidate.logits for candidate in candidates])[:, None]
    return F.interpolate(logits, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)[:, 0] > 0


def pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(masks[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def mask_features(candidates: list[Candidate], gray: np.ndarray) -> list[dict[str, float]]:
    """Ground-truth-free features of every candidate (FEATURE_NAMES), measured at FEATURE_SIZE²."""
    masks = _small_masks(candidates)
    image = torch.from_numpy(gray).float()[None, None]
    small_gray = F.interpolate(image, size=(FEATURE_SIZE, FEATURE_SIZE), mode="area")[0, 0]
    image_mean, spread = float(small_gray.mean()), float(small_gray.std()) + 1e-6
    grad_y, grad_x = torch.gradient(small_gray)
    gradient = torch.hypot(grad_x, grad_y)
    mean_gradient = float(gradient.mean()) + 1e-6
    rings = _dilate(masks, max(1, FEATURE_SIZE // 32)) & ~masks
    outlines = masks & _dilate(~masks, 1)
    border = torch.zeros(FEATURE_SIZE, FEATURE_SIZE, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    overlaps = pairwise_iou(masks)
    coords = (torch.arange(FEATURE_SIZE, dtype=torch.float32) + 0.5) / FEATURE_SIZE
    others = max(1, len(candidates) - 1)
    features = []
    for index, candidate in enumerate(candidates):
        mask = masks[index]
        prompt = {name: float(candidate.features.get(name, 0.0)) for name in ("seed_rank", "whole", "refined", "from_map")}
        area = float(mask.float().mean())
        if area == 0:
            features.append({**prompt, "iou": candidate.score, "stability": candidate.stability, "area": 0.0})
            continue
        inside = small_gray[mask]
        ring = small_gray[rings[index]] if rings[index].any() else inside
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        box_area = (rows[-1] - rows[0] + 1).item() * (cols[-1] - cols[0] + 1).item() / FEATURE_SIZE**2
        ys, xs = torch.nonzero(mask, as_tuple=True)
        row_overlaps = torch.cat([overlaps[index, :index], overlaps[index, index + 1 :]])
        log_area = math.log(area)
        features.append(
            {
                **prompt,
                "iou": float(candidate.score),
                "stability": float(candidate.stability),
                "area": area,
                "log_area": log_area,
                "log_area_sq": log_area**2,
                "border": float((mask & border).float().sum() / border.float().sum()),
                "darkness": float(ring.mean() - inside.mean()) / spread,
                "inside_offset": float(inside.mean()) - image_mean,
                "inside_std": float(inside.std()) if inside.numel() > 1 else 0.0,
                "edge": float(gradient[outlines[index]].mean()) / mean_gradient if outlines[index].any() else 0.0,
                "fill": area / box_area,
                "consensus": float(row_overlaps.sum()) / others,
                "support": float((row_overlaps >= 0.5).float().sum()) / others,
                "centre_y": float(coords[ys].mean()),
                "centre_x_offset": abs(float(coords[xs].mean()) - 0.5),
                "box_touch": _box_touch(mask, candidate.prompt_box),
            }
        )
    return features


def _box_touch(mask: torch.Tensor, box: tuple[float, float, float, float] | None) -> float:
    """Fraction of the prompt box's inner sides (those not on the image edge) that the mask reaches."""
    if box is None:
        return 0.0
    size = mask.shape[-1]
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    x0, y0, x1, y1 = (round(value * size) for value in box)
    sides = [(x0 > 0, cols[0].item() <= x0), (y0 > 0, rows[0].item() <= y0),
             (x1 < size, cols[-1].item() + 1 >= x1), (y1 < size, rows[-1].item() + 1 >= y1)]
    inner = [reached for is_inner, reached in sides if is_inner]
    return sum(inner) / len(inner) if inner else 0.0


def merge_duplicates(ranked: list[Candidate]) -> list[Candidate]:
    """Drop every mask that overlaps a better-ranked kept mask with IoU >= DUPLICATE_IOU."""
    if len(ranked) < 2:
        return list(ranked)
    overlaps = pairwise_iou(_small_masks(ranked))
    kept: list[int] = []
    for index in range(len(ranked)):
        if all(overlaps[index, other] < DUPLICATE_IOU for other in kept):
            kept.append(index)
    return [ranked[index] for index in kept]


def proposals(policy: RoiPolicy, gray: np.ndarray, decoder: BoxDecoder) -> list[tuple[str, list[float], dict]]:
    """(source, box, prompt features) of every first-round prompt (the embedding map's read ``decoder``'s embedding)."""
    boxes: list[tuple[str, list[float], dict]] = []
    if policy.whole_box:
        boxes.append(("whole image", [0.0, 0.0, 1.0, 1.0], {"whole": 1.0}))
    if policy.center_side:
        low, high = 0.5 - policy.center_side / 2, 0.5 + policy.center_side / 2
        boxes.append((f"centre {policy.center_side:.2f}", [low, low, high, high], {}))
    boxes.extend((source, box, {}) for source, box in grid_boxes(policy.grid_scales, policy.grid_steps))
    if policy.blob_polarity and policy.blob_count:
        blobs = find_blobs(gray, policy.blob_polarity, policy.blob_count, policy.blob_scales, policy.blob_surround,
                           foreground_erosion=policy.blob_foreground_erosion)
        for rank, blob in enumerate(blobs, start=1):
            half_sides = [scale * blob.sigma for scale in policy.blob_sigma_scales] + list(policy.blob_half_sides)
            for half in half_sides:
                source = f"{policy.blob_polarity} blob #{rank} ({blob.cx:.2f}, {blob.cy:.2f}) half-side {half:.3f}"
                boxes.append((source, blob.box(half), {"seed_rank": float(rank)}))
    if policy.has_map:
        boxes.extend(map_boxes(policy, decoder))
    return boxes


def decode(policy: RoiPolicy, decoder: BoxDecoder, prompts: list[tuple[str, list[float], dict]]) -> list[Candidate]:
    outputs = MASK_OUTPUTS[policy.mask_outputs]
    candidates = []
    for start in range(0, len(prompts), policy.decode_batch):
        chunk = prompts[start : start + policy.decode_batch]
        logits, ious = decoder.decode_boxes(np.array([box for _, box, _ in chunk], dtype=np.float32))
        stabilities = stability_scores(logits)
        for row, (source, box, prompt_features) in enumerate(chunk):
            for output in outputs:
                candidates.append(
                    Candidate(
                        logits=logits[row, output],
                        score=float(ious[row, output]),
                        stability=float(stabilities[row, output]),
                        source=source + (f" mask {output}" if len(outputs) > 1 else ""),
                        prompt_box=tuple(box),
                        features=dict(prompt_features),
                    )
                )
    return candidates


def score(policy: RoiPolicy, candidates: list[Candidate], gray: np.ndarray) -> None:
    """Fill ``features`` and ``policy_score`` of every candidate in place."""
    if not candidates:
        return
    for candidate, features in zip(candidates, mask_features(candidates, gray)):
        candidate.features = features
        if not policy.min_area <= features["area"] <= policy.max_area:
            candidate.policy_score = -math.inf
        else:
            candidate.policy_score = sum(weight * features[name] for name, weight in policy.weights.items())


def choose(policy: RoiPolicy, candidates: list[Candidate], gray: np.ndarray) -> tuple[list[Candidate], int | None]:
    """Score, rank best first, drop near-duplicates of better masks; the ROI is the first unless none is
    eligible (every mask outside the area range)."""
    score(policy, candidates, gray)
    ranked = merge_duplicates(sorted(candidates, key=lambda candidate: -candidate.policy_score))
    roi_index = 0 if ranked and math.isfinite(ranked[0].policy_score) else None
    return ranked, roi_index


def select(policy: RoiPolicy, gray: np.ndarray, decoder: BoxDecoder) -> tuple[list[Candidate], int | None]:
    candidates = decode(policy, decoder, proposals(policy, gray, decoder))
    ranked, roi_index = choose(policy, candidates, gray)
    for step in range(1, policy.refine_steps + 1):
        if roi_index is None:
            break
        prompts = []
        for parent in ranked[: policy.refine_top]:
            box = mask_box(parent.mask, policy.refine_margin)
            if box is not None and math.isfinite(parent.policy_score):
                prompt_features = {"refined": 1.0, "seed_rank": parent.features.get("seed_rank", 0.0)}
                prompts.append((f"refine {step} of [{parent.source}]", box, prompt_features))
        ranked, roi_index = choose(policy, ranked + decode(policy, decoder, prompts), gray)
    return ranked, roi_index


def run(policy: RoiPolicy, gray: np.ndarray, decoder: BoxDecoder, store_resolution: int) -> SegmentationResult:
    ranked, roi_index = select(policy, gray, decoder)
    return assemble_result(ranked, roi_index, store_resolution)
