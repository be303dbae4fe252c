"""Every source mode decodes to (H, W, 3) uint8 with its content intact; broken files raise a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medfocus.pipeline.images import ImageDecodeError, load_image


@pytest.fixture
def gray() -> np.ndarray:
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 32×64 ramp


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK"])
def test_pil_modes_round_trip(tmp_path, gray, mode):
    rgb = np.stack([gray, gray[:, ::-1], np.full_like(gray, 77)], axis=2)
    source = Image.fromarray(gray if mode == "L" else rgb)
    image = source.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    image.save(path, quality=100) if suffix == ".jpg" else image.save(path)
    decoded = load_image(path)
    assert decoded.shape == (32, 64, 3) and decoded.dtype == np.uint8
    expected = np.asarray(image.convert("RGB"))
    tolerance = 3 if mode == "CMYK" else 0  # JPEG keeps CMYK only approximately
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= tolerance
    if mode == "L":
        assert (decoded[..., 0] == gray).all() and (decoded[..., 0] == decoded[..., 2]).all()


def test_rgba_transparency_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    decoded = load_image(tmp_path / "a.png")
    assert (decoded[:4] == 200).all() and (decoded[4:] == 0).all()


def test_16_bit_is_stretched_not_truncated(tmp_path):
    values = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    decoded = load_image(tmp_path / "deep.png")
    # >> 8 would give values 3..11; stretching uses the whole range and keeps the order
    assert decoded[..., 0].min() <= 2 and decoded[..., 0].max() >= 253
    assert (np.diff(decoded[..., 0].ravel().astype(int)) >= 0).all()


def _write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_decodes_with_rescale_and_polarity(tmp_path, photometric):
    pixels = np.zeros((40, 50), dtype=np.uint16)
    pixels[10:20, 10:30] = 3000  # a bright block on a dark background
    path = tmp_path / "scan"  # DICOM needs no suffix: the DICM magic is enough
    _write_dicom(path, pixels, photometric)
    decoded = load_image(path)
    assert decoded.shape == (40, 50, 3)
    inside, outside = decoded[15, 20, 0], decoded[0, 0, 0]
    if photometric == "MONOCHROME2":
        assert inside > outside
    else:  # MONOCHROME1 shows high values dark
        assert inside < outside


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_broken_files_raise_a_clear_error(tmp_path, payload):
    path = tmp_path / "broken.png"
    path.write_bytes(payload)
    with pytest.raises(ImageDecodeError):
        load_image(path)


def test_truncated_jpeg_is_corrupt(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "cut.jpg")
