"""Imports run downhill: trainer/ (tensors in, heads out) <- pipeline/ (data, models, stores) <- stages/ (one module per
DVC stage, the CLI on top). Read from the source with ``ast``, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("trainer", "pipeline", "stages")
CLI = "stages/cli.py"


def _module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["medfocus", *parts])


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every medfocus module ``path`` imports (absolute or relative, at any depth of the file)."""
    own = _module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from medfocus.stages import features`` imports a module, not a name.
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("medfocus.")}


def _layer(module: str) -> str | None:
    part = module.split(".")[1] if module.count(".") >= 1 else ""
    return part if part in LAYERS else None


def _source_files(root: Path, layer: str) -> list[Path]:
    return sorted((root / layer).rglob("*.py"))


def violations(root: Path = ROOT) -> list[str]:
    found = []
    stage_modules = {_module_name(p, root) for p in _source_files(root, "stages") if p.name != "__init__.py"}
    for layer in LAYERS:
        below = LAYERS[: LAYERS.index(layer) + 1]
        for path in _source_files(root, layer):
            relative = path.relative_to(root).as_posix()
            own = _module_name(path, root)
            for module in sorted(imported_modules(path, root)):
                target = _layer(module)
                if target is not None and target not in below:
                    found.append(f"{relative} imports {module} ({layer}/ must not import {target}/)")
                if layer == "stages" and relative != CLI and module in stage_modules and module != own:
                    found.append(f"{relative} imports the stage module {module} (stages share code through pipeline/ or trainer/)")
    return found


def test_every_import_runs_downhill():
    assert violations() == []


@pytest.mark.parametrize("source, layer, expected", [
    ("from medfocus.stages.train import train\n", "pipeline/x.py", "pipeline/ must not import stages/"),
    ("def f():\n    from medfocus.pipeline.provenance import RANDOM_INIT\n", "trainer/x.py", "trainer/ must not import pipeline/"),
    ("from .features import steer\n", "stages/x.py", "imports the stage module medfocus.stages.features"),
    ("from medfocus.stages import report\n", "stages/x.py", "imports the stage module medfocus.stages.report"),
])
def test_an_import_back_up_is_caught(source, layer, expected, tmp_path):
    """The checker itself: an import back up, or from one stage into another, is reported (in a copy of the tree)."""
    for folder in LAYERS:
        for path in _source_files(ROOT, folder):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    assert violations(tmp_path) == []
    (tmp_path / layer).write_text(source)
    assert any(expected in line for line in violations(tmp_path))


def test_only_the_cli_may_import_stage_modules():
    cli_imports = imported_modules(ROOT / CLI)
    assert "medfocus.stages.segment" in cli_imports and "medfocus.stages.report" in cli_imports


# Modules that move data around without deciding a number (settings, paths, storage, orchestration, provenance):
# DVC follows the params sections and the files these read, not their code.
INFRASTRUCTURE = {
    "pipeline/config.py", "pipeline/datasets.py", "pipeline/paths.py", "pipeline/manifest.py", "pipeline/provenance.py",
    "pipeline/runner.py", "pipeline/store.py", "pipeline/worker_models.py", "pipeline/stage_outputs.py",
    "pipeline/preparation.py", "pipeline/images.py",
}


@pytest.mark.parametrize("stage", ["train", "evaluate", "report"])
def test_dvc_stages_depend_on_the_code_they_run(stage):
    """A stage that runs on cached tensors depends on its code in dvc.yaml: a module it imports that decides its
    results (anything but the infrastructure above) is one of its deps, or under a folder that is."""
    import yaml

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]["deps"]
    code_deps = [d for d in deps if not d.startswith("cache/")]
    assert f"stages/{stage}.py" in code_deps
    for module in imported_modules(ROOT / "stages" / f"{stage}.py"):
        parts = module.split(".")[1:]
        path = ROOT.joinpath(*parts).with_suffix(".py")
        if not path.is_file():
            continue
        relative = path.relative_to(ROOT).as_posix()
        if relative in INFRASTRUCTURE:
            continue
        assert any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in code_deps), \
            f"dvc.yaml stage {stage} does not depend on {relative}, which stages/{stage}.py imports"
