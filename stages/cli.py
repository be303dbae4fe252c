"""The ``medfocus`` command line: one command per pipeline stage, each reading params.yaml, options overriding it.

An option means one thing in every command that has it: ``--model``/``--pretrained`` the image encoder (features.model,
features.pretrained), which also picks the feature stores later commands read; ``--mode`` ROI steering modes (feature
stores); ``--fraction``/``--shots``/``--seed`` training subsets (a fraction of the training images, k images per class,
the subset and training seed); ``--store-root`` where the mask and feature stores are. Commands that run many
(features, evaluate) take them repeated.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from medfocus.pipeline.config import ConfigError, Params, load_params
from medfocus.pipeline.datasets import DatasetSpec, UnknownDatasetError, registry, resolve_dataset
from medfocus.pipeline.manifest import DatasetError
from medfocus.pipeline.paths import DEFAULT_CACHE_ROOT, DatasetPaths
from medfocus.pipeline import vocabulary
from medfocus.pipeline.segmenters.policies import BUILTIN_POLICY_NAMES
from medfocus.pipeline.store import StoreMismatchError
from medfocus.pipeline.vocabulary import spelled_out
from medfocus.trainer.config import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("medfocus")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix: shown as one clear message and exit code 2, without a traceback."""
    from medfocus.pipeline.current_stores import SpecOutdatedError
    from medfocus.pipeline.encoders import PretrainedWeightsUnavailable, UnsupportedEncoderFeature
    from medfocus.pipeline.images import ImageDecodeError
    from medfocus.pipeline.medsam_lite_identity import WeightsUnavailableError
    from medfocus.trainer import FeatureMismatchError, MethodUnavailableError

    from medfocus.pipeline.segmenters.policies import PolicyFileError, RoiInputError

    return (ConfigError, DatasetError, UnknownDatasetError, StoreMismatchError, FileNotFoundError, ImageDecodeError, PretrainedWeightsUnavailable,
            UnsupportedEncoderFeature, WeightsUnavailableError, FeatureMismatchError, MethodUnavailableError, SpecOutdatedError,
            PolicyFileError, RoiInputError)


STEERING_MODES = spelled_out(vocabulary.STEERING_MODES)
DatasetOption = typer.Option(..., "--dataset", "-d", help="Registered dataset name, or any name with --root for your own folder.")
RootOption = typer.Option(None, "--root", help="Dataset folder (folder-per-class, train/ + test/, or a CSV path,label[,split]).")
ParamsOption = typer.Option(None, "--params", help="params.yaml to read (default: ./params.yaml if present).")
CacheOption = typer.Option(DEFAULT_CACHE_ROOT, "--cache-dir", help="Where pipeline outputs go.")
SchedulerOption = typer.Option(None, "--scheduler", help="synchronous | threads | processes | local-cluster[:N] | tcp://host:port")
WorkersOption = typer.Option(None, "--workers", help="Workers for threads/processes/local-cluster.")
StoreRootOption = typer.Option(None, "--store-root", help="Where the mask and feature stores are (a shared path or an fsspec URL) instead of cache/<dataset>.")
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bar.")
ModelOption = typer.Option(None, "--model", help=f"Image encoder (features.model): {vocabulary.ENCODER_MODELS}; it names the feature stores. An encoder bank: names joined by '+' (litemedsam+efficientnet_lite2).")
PretrainedOption = typer.Option(None, "--pretrained", help="Encoder weights (features.pretrained): auto, none, an open_clip tag, an hf-hub: name or a local file.")
MethodOption = typer.Option(None, "--method", help=f"Trainer method (train.method): {spelled_out(METHODS)}.")
BackendOption = typer.Option(None, "--backend", help=f"Segmenter (segment.backend): {spelled_out(vocabulary.SEGMENTER_BACKENDS)} (litemedsam ships pretrained; sam2 needs weights).")
PolicyOption = typer.Option(None, "--policy", help=f"ROI policy (segment.policy): {spelled_out(['auto', *BUILTIN_POLICY_NAMES])}, or the path of a policy file (written by `medfocus roi-fit`; relative paths are read from the working directory); auto = the measured best for the dataset.")
TrainModeOption = typer.Option(None, "--mode", help=f"ROI steering mode (feature store) of the head (train.mode): {STEERING_MODES}.")
ExternalOption = typer.Option(None, "--external", help="An external test set NAME=PATH (evaluate.external.NAME.root, for this "
                                                       "dataset; repeatable); its class_map, if needed, in params.yaml.")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _run(action: Callable[[], Any]) -> Any:
    _setup_logging()
    try:
        return action()
    except _user_errors() as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    except (PermissionError, IsADirectoryError, NotADirectoryError) as error:
        # A read-only --cache-dir, an unwritable --store-root, a file where a folder belongs: the path says which.
        typer.secho(f"error: {error.strerror}: {error.filename} (check --cache-dir / --store-root / --root and their "
                    "permissions)", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None


# Options whose name is not the last part of the params key they set (the rest: medfocus.pipeline.config.option_name).
OPTION_OF = {"prepare.seed": "--split-seed", "features.modes": "--mode", "evaluate.methods": "--method",
             "evaluate.modes": "--mode", "evaluate.fractions": "--fraction", "evaluate.seeds": "--seed",
             "train.lambda": "--lambda", "segment.store_root": "--store-root", "features.store_root": "--store-root"}


def _load(params_file: Optional[Path], overrides: dict[str, Any]) -> Params:
    return load_params(params_file, overrides, OPTION_OF)


def _on_dataset(dataset: str, root: Optional[Path], params_file: Optional[Path], cache_dir: Path, overrides: dict[str, Any],
                work: Callable[[DatasetSpec, Params, DatasetPaths], Any]) -> Any:
    """What every dataset command does around its own work: params with its options applied, the dataset and its
    paths, and user errors reported as one line (exit code 2)."""

    def action() -> Any:
        params = _load(params_file, overrides)
        return work(resolve_dataset(dataset, root, params), params, DatasetPaths(dataset, cache_dir))

    return _run(action)


def _store_root(store_root: Optional[str]) -> dict[str, Any]:
    """Masks and features live under one root: features read the masks, every later stage reads both."""
    return {"segment.store_root": store_root, "features.store_root": store_root}


def _external(values: Optional[list[str]], dataset: str) -> dict[str, Any]:
    """``--external NAME=PATH`` as overrides of evaluate.external.NAME (root, and the dataset it is external to)."""
    overrides: dict[str, Any] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{value!r}: give NAME=PATH, e.g. br35h=../shared/datasets/brain_mri_external/images",
                                     param_hint="--external")
        overrides |= {f"evaluate.external.{name}.root": path, f"evaluate.external.{name}.dataset": dataset}
    return overrides


def _encoder(model: Optional[str], pretrained: Optional[str]) -> dict[str, Any]:
    return {"features.model": model, "features.pretrained": pretrained}


def _print_json(payload: dict) -> None:
    typer.echo(json.dumps(payload, indent=2))


def _print_summary(metrics: dict, paths: DatasetPaths, err: bool = False) -> None:
    """The headline of an evaluation (what the report opens with), as text."""
    from medfocus.pipeline.results_summary import render_text

    typer.echo(("\n" if err else "") + render_text(metrics["summary"], str(paths.metrics)), nl=False, err=err)


@app.command()
def datasets(params_file: Optional[Path] = ParamsOption) -> None:
    """List the registered datasets, their roots and whether their data is present."""

    def action() -> None:
        params = _load(params_file, {})
        for name, spec in sorted(registry(params).items()):
            present = "present" if spec.root.exists() else ("generated on first use" if name == "demo" else "absent")
            typer.echo(f"{name:16s} {str(spec.root):32s} {present:24s} classes: {', '.join(spec.class_names)}")

    _run(action)


@app.command()
def prepare(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="Held-out share per class when the dataset has no test split, in (0, 1)."),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="Seed of that test split (prepare.seed); training subsets have their own seeds."),
    rehash: bool = typer.Option(False, "--rehash", help="Read and hash every file, also those whose path, size, times and inode say they are unchanged."),
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Decode, hash, de-duplicate and split a dataset: cache/<dataset>/manifest.csv, splits.json, prepare.json.

    The split it makes stays until the next `medfocus prepare`: later commands never re-split with other settings.
    """
    from medfocus.stages.prepare import overview
    from medfocus.stages.prepare import prepare as run_prepare

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        _print_json(overview(run_prepare(spec, params, paths, progress=not quiet, rehash=rehash), paths))

    _on_dataset(dataset, root, params_file, cache_dir, {"prepare.test_fraction": test_fraction, "prepare.seed": split_seed}, work)


@app.command()
def resolve(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Write today's content specs of segment and features (what `auto` resolves to included); builds no model."""
    from medfocus.stages.resolve import resolve as run_resolve

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
        result = run_resolve(spec, params, paths)
        _print_json(result | {"specs": [str(paths.segment_spec), str(paths.features_spec)]})
        return result

    _on_dataset(dataset, root, params_file, cache_dir, _encoder(model, pretrained), work)


def main() -> None:  # pragma: no cover - console entry
    app()


def _exit_if_everything_failed(summary: dict) -> None:
    """Exit code 0 unless every image that needed work failed (then something is wrong with the set-up, not the data)."""
    if summary["failed_count"] and summary["processed"] == 0 and summary["skipped"] == 0:
        typer.secho(f"error: all {summary['failed_count']} images failed; first reason: {summary['failed'][0]['reason']}",
                    err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)


def _stage_overview(summary: dict, extra: tuple[str, ...] = ()) -> dict:
    keys = ("processed", "skipped", "failed_count", "seconds", "images_per_s", "store", *extra)
    return {k: summary[k] for k in keys if k in summary} | {"failed": [f"{f['path']}: {f['reason']}" for f in summary["failed"]]}


@app.command()
def segment(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    backend: Optional[str] = BackendOption,
    policy: Optional[str] = PolicyOption,
    sam2_model: Optional[str] = typer.Option(None, "--sam2-model", help=f"SAM2 size: {spelled_out(vocabulary.SAM2_MODELS)}."),
    sam2_checkpoint: Optional[str] = typer.Option(None, "--sam2-checkpoint", help="Local checkpoint path, or 'auto' (Hugging Face hub cache)."),
    sam2_mode: Optional[str] = typer.Option(None, "--sam2-mode", help="auto (the paper's automatic mask generator) or prompted (fast)."),
    sam2_image_size: Optional[int] = typer.Option(None, "--sam2-image-size", help="Prompted mode's input side (multiple of 32, 256-1024; 512 is fast on CPU)."),
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    store_root: Optional[str] = StoreRootOption,
    external: Optional[list[str]] = ExternalOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Segment every image once into the dataset's Zarr mask store (new images only on a rerun), external test sets' too."""
    from medfocus.stages.segment import segment as run_segment

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
        summary = run_segment(spec, params, paths, progress=not quiet)
        _print_json(_stage_overview(summary, ("policy",)) | {"summary": str(paths.segment_summary)})
        return summary

    overrides = {"segment.backend": backend, "segment.policy": policy, "segment.sam2_model": sam2_model,
                 "segment.sam2_checkpoint": sam2_checkpoint, "segment.sam2_mode": sam2_mode,
                 "segment.sam2_image_size": sam2_image_size, "segment.scheduler": scheduler, "segment.workers": workers,
                 **_store_root(store_root), **_external(external, dataset)}
    _exit_if_everything_failed(_on_dataset(dataset, root, params_file, cache_dir, overrides, work))


@app.command("show-masks")
def show_masks(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    count: int = typer.Option(8, "--count", "-n", min=1, max=64, help="How many images."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default cache/<dataset>/masks_gallery.png)."),
    store_root: Optional[str] = StoreRootOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Write a PNG gallery of images with every mask and the ROI overlaid."""
    from medfocus.pipeline.current_stores import current_mask_store, current_segment_spec
    from medfocus.pipeline.gallery import write_gallery
    from medfocus.pipeline.preparation import load_prepared

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        prepared = load_prepared(spec, params, paths)
        segmenter = current_segment_spec(spec, params, paths)
        store = current_mask_store(spec, params, paths, segmenter)
        title = f"{dataset}: {segmenter.build_options['backend']} masks, ROI policy {segmenter.content['policy']['name']}"
        typer.echo(str(write_gallery(prepared, store, output or paths.gallery, count, title)))

    _on_dataset(dataset, root, params_file, cache_dir, _store_root(store_root), work)


@app.command()
def features(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    mode: Optional[list[str]] = typer.Option(None, "--mode", help=f"ROI steering modes to encode (features.modes; repeatable): {STEERING_MODES}."),
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    store_root: Optional[str] = StoreRootOption,
    external: Optional[list[str]] = ExternalOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Encode every image once per ROI steering mode into Zarr feature stores (new images only on a rerun), external
    test sets' too."""
    from medfocus.stages.features import features as run_features

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> dict:
        summary = run_features(spec, params, paths, progress=not quiet)
        overview = _stage_overview(summary, ("weights_source",))
        overview["stores"] = {m: v["store"] for m, v in summary["modes"].items()}
        if summary.get("bank_runs"):  # an encoder bank: every encoder's stores
            overview["bank_stores"] = {run["encoder"]: {m: v["store"] for m, v in run["modes"].items()} for run in summary["bank_runs"]}
        _print_json(overview | {"summary": str(paths.features_summary)})
        return summary

    overrides = {**_encoder(model, pretrained), "features.modes": mode or None, "features.scheduler": scheduler,
                 "features.workers": workers, **_store_root(store_root), **_external(external, dataset)}
    _exit_if_everything_failed(_on_dataset(dataset, root, params_file, cache_dir, overrides, work))


@app.command()
def train(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    method: Optional[str] = MethodOption,
    mode: Optional[str] = TrainModeOption,
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Train on this fraction of the training images (one of prepare.fractions)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Train on k images per class instead of a fraction (one of prepare.shots)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Subset and training seed (one of prepare.subset_seeds)."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help="Loss mix λ·L_c + (1−λ)·L_e."),
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    store_root: Optional[str] = StoreRootOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Fit one head on the cached features of a training subset and save it under cache/<dataset>/models/."""
    from medfocus.stages.train import train as run_train

    overrides = {"train.method": method, "train.mode": mode, "train.fraction": fraction, "train.shots": shots,
                 "train.seed": seed, "train.lambda": lambda_, **_encoder(model, pretrained), **_store_root(store_root)}
    _on_dataset(dataset, root, params_file, cache_dir, overrides,
                lambda spec, params, paths: _print_json(run_train(spec, params, paths)))


@app.command()
def evaluate(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    method: Optional[list[str]] = typer.Option(None, "--method", help="Methods to compare (evaluate.methods; repeatable)."),
    mode: Optional[list[str]] = typer.Option(None, "--mode", help=f"ROI steering modes (feature stores) to compare (evaluate.modes; repeatable): {STEERING_MODES}."),
    fraction: Optional[list[float]] = typer.Option(None, "--fraction", help="Training fractions to run (evaluate.fractions; repeatable; each one of prepare.fractions)."),
    shots: Optional[list[int]] = typer.Option(None, "--shots", help="Also run k images per class (evaluate.shots; repeatable; each one of prepare.shots)."),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="Subset and training seeds (evaluate.seeds; repeatable)."),
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    store_root: Optional[str] = StoreRootOption,
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    external: Optional[list[str]] = ExternalOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Run the protocol (methods × modes × fractions × seeds) and write metrics.json, runs.csv and plots; the fits run
    as dask tasks, one per training subset and mode. Every fit is also scored on the external test sets."""
    from medfocus.stages.evaluate import evaluate as run_evaluate

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        from medfocus.pipeline.results_summary import flat_headline

        metrics = run_evaluate(spec, params, paths, progress=not quiet)
        summary = metrics.get("summary")
        # The data on stdout (JSON, as every command), then the headline for the reader, last, on stderr.
        _print_json({"weights_source": metrics["weights_source"], "random_init": metrics["random_init"],
                     **({"headline": flat_headline(summary)} if summary else {}), "metrics": str(paths.metrics)})
        if summary:
            _print_summary(metrics, paths, err=True)

    overrides = {"evaluate.methods": method or None, "evaluate.modes": mode or None, "evaluate.fractions": fraction or None,
                 "evaluate.shots": shots or None, "evaluate.seeds": seed or None, "evaluate.scheduler": scheduler,
                 "evaluate.workers": workers, **_encoder(model, pretrained), **_store_root(store_root),
                 **_external(external, dataset)}
    _on_dataset(dataset, root, params_file, cache_dir, overrides, work)


@app.command()
def external(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    external_sets: Optional[list[str]] = ExternalOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Prepare the dataset's external test sets (evaluate.external): their manifests, class maps, and copies of the
    training dataset's images removed and counted; writes cache/<dataset>/external.json."""
    from medfocus.pipeline.external import prepare_externals
    from medfocus.pipeline.preparation import load_prepared

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        summary = prepare_externals(spec, params, paths, load_prepared(spec, params, paths, progress=not quiet),
                                    progress=not quiet)
        _print_json({name: {key: item[key] for key in ("images", "counts", "class_map", "unmapped_training_classes")}
                     | {"removed_copies_of_training_source": {k: item["copies_of_training_source"][k]
                                                              for k in ("byte_copies", "near_copies")}}
                     for name, item in summary["sets"].items()} | {"summary": str(paths.external_summary)})

    _on_dataset(dataset, root, params_file, cache_dir, _external(external_sets, dataset), work)


@app.command()
def summary(
    dataset: str = DatasetOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Print what the last `medfocus evaluate` found: data, models, ROI quality, the headline, the compact table and
    the per-class results (the same as the report's top)."""

    def action() -> None:
        paths = DatasetPaths(dataset, cache_dir)
        if not paths.metrics.exists():
            raise FileNotFoundError(f"no {paths.metrics}: run `medfocus evaluate --dataset {dataset}` first")
        metrics = json.loads(paths.metrics.read_text())
        if "summary" not in metrics:
            raise FileNotFoundError(f"{paths.metrics} predates the summary: rerun `medfocus evaluate --dataset {dataset}`")
        _print_summary(metrics, paths)

    _run(action)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (any format prepare reads, DICOM included)."),
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    head: Optional[Path] = typer.Option(None, "--head", help="A head saved by `medfocus train` (default: the one params.yaml's train section names)."),
    mode: Optional[str] = TrainModeOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    store_root: Optional[str] = StoreRootOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Classify new images: segment + encode each with the dataset's settings, then the trained head; writes overlay PNGs."""
    from medfocus.stages.predict import predict as run_predict

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        for result in run_predict(spec, params, paths, images, head):
            _print_json(result)

    overrides = {"train.mode": mode, **_encoder(model, pretrained), **_store_root(store_root)}
    _on_dataset(dataset, root, params_file, cache_dir, overrides, work)


MasksOption = typer.Option(None, "--masks", help="Folder of ground-truth masks: same relative paths as the images, plus --suffix.")
BoxesOption = typer.Option(None, "--boxes", help="Ground-truth boxes: a folder of YOLO .txt files (same relative paths as the images, "
                           "'label x_center y_center width height' in fractions per line), or a CSV path,x0,y0,x1,y1 in pixels "
                           "(paths relative to the dataset root). No box (no file, an empty file, no row): no lesion.")
SuffixOption = typer.Option("_mask.png", "--suffix", help="Appended to an image's stem to name its mask.")


def _first_per_class(prepared, limit: Optional[int]) -> list[tuple[Path, str]]:
    """(image path, class) of every prepared image, or of the first ``limit`` of each class."""
    taken: dict[str, int] = {}
    items = []
    for entry in prepared.entries:
        if limit is None or taken.get(entry.label, 0) < limit:
            taken[entry.label] = taken.get(entry.label, 0) + 1
            items.append((prepared.image_path(entry), entry.label))
    return items


@app.command("roi-eval")
def roi_eval(
    dataset: str = DatasetOption,
    masks: Optional[Path] = MasksOption,
    boxes: Optional[Path] = BoxesOption,
    root: Optional[Path] = RootOption,
    suffix: str = SuffixOption,
    policy: Optional[str] = PolicyOption,
    backend: Optional[str] = BackendOption,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images per class (quick looks)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON report (default cache/<dataset>/roi_eval.json)."),
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """How well the automatic ROI finds the annotated region, per class and overall, with seconds per image: box IoU
    (the ROI's bounding box against the ground-truth box; several boxes: their union box) and hit rate (the ROI covers
    at least half of that box), and with --masks Dice and IoU. Images without a lesion are reported apart (empty_gt)."""
    from medfocus.pipeline.manifest import write_json
    from medfocus.pipeline.preparation import load_prepared
    from medfocus.pipeline.current_stores import current_segment_spec
    from medfocus.pipeline.segmenters import create_segmenter, evaluate_roi
    from medfocus.pipeline.segmenters.roi_eval import GroundTruth

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        GroundTruth(masks, suffix, boxes)  # refuse missing ground truth before any image is read
        prepared = load_prepared(spec, params, paths, progress=not quiet)
        items = _first_per_class(prepared, limit)
        segmenter = create_segmenter(**current_segment_spec(spec, params, paths).build_options)
        report = evaluate_roi(segmenter, items, masks, suffix, images_root=prepared.root.resolve(), progress=not quiet,
                              boxes=boxes)
        path = output or paths.dir / "roi_eval.json"
        write_json(path, report)
        _print_json({k: report[k] for k in ("per_class", "lesion", "empty_gt", "overall", "ground_truth")} | {"report": str(path)})

    _on_dataset(dataset, root, params_file, cache_dir, {"segment.policy": policy, "segment.backend": backend}, work)


@app.command("roi-fit")
def roi_fit(
    dataset: str = DatasetOption,
    output: Path = typer.Option(..., "--output", "-o", help="The policy file to write (JSON); use it with --policy FILE or segment.policy."),
    masks: Optional[Path] = MasksOption,
    boxes: Optional[Path] = BoxesOption,
    root: Optional[Path] = RootOption,
    suffix: str = SuffixOption,
    start_from: Optional[str] = typer.Option(None, "--start-from", help="The policy whose proposals, decoding, refinement and area range the fitted one keeps (a built-in name or a policy file; default: segment.policy, auto = the dataset's default)."),
    name: Optional[str] = typer.Option(None, "--name", help="The fitted policy's name (default: the output file's stem)."),
    group_by: str = typer.Option("file", "--group-by", help="What stays on one side of the split: 'file' (each image), 'number:B' (blocks of B consecutive file numbers per folder: neighbouring slices of one patient together) or 'regex:PATTERN' (its first group, else the match, in the path relative to the root, e.g. a patient id)."),
    holdout_fraction: float = typer.Option(0.3, "--holdout-fraction", min=0.0, max=1.0, help="Share of groups held out (each group by a seeded sha256 draw: stable when images are added)."),
    holdout_from: Optional[int] = typer.Option(None, "--holdout-from", min=0, help="Instead: hold out every image whose file number (the last number in its name) is >= N."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the held-out draw."),
    backend: Optional[str] = BackendOption,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images per class (quick looks)."),
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
    quiet: bool = QuietOption,
) -> None:
    """Fit an ROI policy's score weights on your ground-truth masks or boxes and write it as a policy file: the images
    are split into a tune part and a held-out part (--group-by, --holdout-fraction / --holdout-from), the weights fitted
    on the tune part, the held-out scores (box IoU, hit rate, Dice with masks) measured once and written into the file."""
    from medfocus.pipeline.preparation import load_prepared
    from medfocus.pipeline.segmenters import policy_fit
    from medfocus.pipeline.segmenters.policies import default_policy_for, get_policy
    from medfocus.pipeline.segmenters.roi_eval import GroundTruth
    from medfocus.pipeline.specs import resolve_segment

    def action() -> None:
        params = load_params(params_file, {"segment.policy": start_from, "segment.backend": backend},
                             OPTION_OF | {"segment.policy": "--start-from"})
        spec, paths = resolve_dataset(dataset, root, params), DatasetPaths(dataset, cache_dir)
        truth = GroundTruth(masks, suffix, boxes)
        split_options = {"group_by": policy_fit.check_group_by(group_by), "holdout_fraction": holdout_fraction,
                         "holdout_from": holdout_from, "seed": split_seed}
        reference = default_policy_for(spec.name) if params.segment.policy == "auto" else params.segment.policy
        build = dict(resolve_segment(params.segment, spec.name).build_options)
        # The pools decode the start policy's proposals, not the segmenter's own policy (an unfitted embedding map
        # could not segment): the segmenter gets the plainest one.
        start, build["policy"] = get_policy(reference), "whole-image"
        prepared = load_prepared(spec, params, paths, progress=not quiet)
        command = " ".join(["medfocus roi-fit --dataset", spec.name, "--root", str(prepared.root),
                            f"--masks {masks}" if masks else "", f"--boxes {boxes}" if boxes else "",
                            f"--start-from {reference} --group-by {group_by}",
                            f"--holdout-from {holdout_from}" if holdout_from is not None else
                            f"--holdout-fraction {holdout_fraction} --split-seed {split_seed}",
                            f"--limit {limit}" if limit else "", f"-o {output}"]).replace("  ", " ").strip()
        policy_file = policy_fit.fit_policy(
            policy_fit.fit_segmenter(build), start, _first_per_class(prepared, limit), prepared.root.resolve(), truth,
            name=name or output.stem, dataset=spec.name, split_options=split_options, started_from=str(reference),
            command=command, progress=not quiet)
        path = policy_fit.write_policy_file(output, policy_file)
        _print_json({"policy_file": str(path), "name": policy_file.name, "held_out": policy_file.held_out.model_dump(),
                     "counts": policy_file.fitted.counts, "split": policy_file.fitted.split.rule,
                     "tune_cv_score": policy_file.fitted.tune_cv_score})

    _run(action)


@app.command("demo-data")
def demo_data(
    root: Path = typer.Option(Path("data/demo"), "--root", help="The demo dataset's folder, where it is written."),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", min=2, help="Default: prepare.demo_images_per_class."),
    params_file: Optional[Path] = ParamsOption,
) -> None:
    """Write the embedded synthetic demo dataset (no download); does nothing when it is already complete."""
    from medfocus.pipeline.demo import generate_demo

    def action() -> None:
        params = _load(params_file, {"prepare.demo_images_per_class": images_per_class})
        summary = generate_demo(root, images_per_class=params.prepare.demo_images_per_class)
        _print_json({"root": str(root), "counts": summary["counts"], "params": summary["params"],
                     "files_written": summary["files_written"]})

    _run(action)


@app.command()
def report(
    dataset: str = DatasetOption,
    root: Optional[Path] = RootOption,
    mode: Optional[str] = TrainModeOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    store_root: Optional[str] = StoreRootOption,
    params_file: Optional[Path] = ParamsOption,
    cache_dir: Path = CacheOption,
) -> None:
    """Write cache/<dataset>/report/index.html: results beside the paper's, plots, ROI gallery, attention overlays, provenance."""
    from medfocus.stages.report import report as run_report

    def work(spec: DatasetSpec, params: Params, paths: DatasetPaths) -> None:
        summary = run_report(spec, params, paths)
        _print_json({k: summary[k] for k in ("report", "weights_source", "random_init", "images")})

    overrides = {"train.mode": mode, **_encoder(model, pretrained), **_store_root(store_root)}
    _on_dataset(dataset, root, params_file, cache_dir, overrides, work)
