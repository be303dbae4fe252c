"""Decoding every image the datasets bring into one form: an (H, W, 3) uint8 RGB array.

PIL handles L, RGB, RGBA, P, I;16, CMYK (and the rest of its modes); DICOM goes through pydicom with its rescale
and VOI LUT applied. High-bit-depth images are stretched to 0..255 between their 0.5th and 99.5th percentiles,
which keeps the anatomy visible where a plain ``>> 8`` would leave a black image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# A truncated file is corrupt: never let PIL pad it with grey and call it an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"})


class ImageDecodeError(ValueError):
    """The file exists but is not an image we can decode."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_dicom(path: str | Path) -> bool:
    """DICOM files carry 'DICM' at byte 128, whatever their name ends with."""
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    low, high = np.percentile(array, [0.5, 99.5])
    if high <= low:
        low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, low, high) - low) / (high - low) * 255.0
    return np.round(scaled).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _decode_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for broken files
        raise ImageDecodeError(f"unreadable DICOM: {error}") from error
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        # A multi-frame series is a volume; the classifier sees its middle slice.
        pixels = pixels[frames // 2]
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset)
        gray = _stretch_to_uint8(pixels)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        return _gray_to_rgb(gray)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels.astype(np.uint8) if pixels.dtype == np.uint8 else _stretch_to_uint8(pixels)
    raise ImageDecodeError(f"unsupported DICOM photometric interpretation {photometric!r}")


def _decode_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _gray_to_rgb(_stretch_to_uint8(np.asarray(image)))
            if mode in ("RGBA", "LA") or (mode == "P" and "transparency" in image.info):
                # Transparent pixels go on black, the background of every modality we handle.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, or raise :class:`ImageDecodeError` saying why."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"no such file: {path}")
    array = _decode_dicom(path) if is_dicom(path) else _decode_pil(path)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ImageDecodeError(f"decoded to an unexpected shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def looks_like_image(path: Path) -> bool:
    """Files a dataset folder is expected to hold images in: known suffixes, or DICOM without one."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.suffix == "" and path.is_file() and is_dicom(path)



# ---------------------------------------------------------------------------------------------------- near-copies
PERCEPTUAL_HASH_BITS = 64
SIGNATURE_SIDE = 32  # every image is averaged down to 32x32 grey before it is compared
_HASH_KEPT = 8  # the 8x8 lowest DCT frequencies make the 64 hash bits
_SHADING_SIDE = 8  # the structure signature subtracts this coarse a copy of itself: slow shading is not structure


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II basis: ``matrix @ x`` is the DCT of the column vector x."""
    frequency = np.arange(size)[:, None]
    position = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * position + 1) * frequency / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(SIGNATURE_SIDE)
_BIT_WEIGHTS = np.left_shift(np.uint64(1), np.arange(PERCEPTUAL_HASH_BITS, dtype=np.uint64))


@dataclass(frozen=True, eq=False)
class ImageSignature:
    """What near-copy detection compares: a 64-bit DCT hash and a unit-norm 32x32 structure map."""

    phash: int
    structure: np.ndarray  # (SIGNATURE_SIDE**2,) float32, zero mean, unit norm: a dot product is a correlation


def image_signature(image: np.ndarray) -> ImageSignature:
    """The perceptual hash (pHash) and the structure map of an (H, W, 3) uint8 image.

    Both start from the image averaged down to 32x32 grey (BOX averages every source pixel, so the source size does
    not matter; JPEG artefacts and speckle average out).

    - Hash: each of the 8x8 lowest DCT frequencies becomes one bit, above or below their median. Resizing,
      re-encoding and brightness or contrast changes (which move the DC term or scale every coefficient) leave the
      bits where they were; distinct images disagree on about half of them. It finds candidate pairs fast.
    - Structure: the 32x32 image minus its 8x8 shading, normalised. The correlation of two structure maps is 1 for a
      copy up to brightness, contrast and resampling, and drops when anatomy moves, as between neighbouring MRI
      slices, which the 64 hash bits alone cannot tell from copies.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_signature expects an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    grey = Image.fromarray(image).convert("L").resize((SIGNATURE_SIDE, SIGNATURE_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_HASH_KEPT, :_HASH_KEPT].ravel()
    phash = int(np.sum(_BIT_WEIGHTS[low > np.median(low)], dtype=np.uint64))

    square = Image.fromarray(pixels.astype(np.float32), mode="F")
    shading = square.resize((_SHADING_SIDE, _SHADING_SIDE), Image.Resampling.BOX).resize(square.size, Image.Resampling.BILINEAR)
    structure = pixels - np.asarray(shading, dtype=np.float64)
    structure -= structure.mean()
    norm = np.linalg.norm(structure)
    # A flat image has no structure to compare; its zero map correlates 0 with everything, so it is never a near-copy.
    structure = (structure / norm if norm > 1e-6 else np.zeros_like(structure)).astype(np.float32).ravel()
    return ImageSignature(phash, structure)


def hamming_pairs(hashes: np.ndarray, threshold: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """Every pair (i, j, distance) with i < j whose 64-bit hashes differ in at most ``threshold`` bits.

    Distances are computed ``block`` rows against all columns at a time, so memory stays at block x n bytes.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.ndim != 1:
        raise ValueError(f"hashes must be a 1-D array, got shape {hashes.shape}")
    if not 0 <= threshold <= PERCEPTUAL_HASH_BITS:
        raise ValueError(f"threshold must be a number of bits in [0, {PERCEPTUAL_HASH_BITS}], got {threshold}")
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        distances = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        row, column = np.nonzero(distances <= threshold)
        upper = column > row + start
        row, column = row[upper], column[upper]
        pairs.extend(zip((row + start).tolist(), column.tolist(), distances[row, column].tolist()))
    return pairs
