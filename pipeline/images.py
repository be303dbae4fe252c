"""Decoding every image the datasets bring into one form: an (H, W, 3) uint8 RGB array.

PIL handles L, RGB, RGBA, P, I;16, CMYK (and the rest of its modes); DICOM goes through pydicom with its rescale
and VOI LUT applied. High-bit-depth images are stretched to 0..255 between their 0.5th and 99.5th percentiles,
which keeps the anatomy visible where a plain ``>> 8`` would leave a black image.
"""

from __future__ import annotations

import hashlib
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
