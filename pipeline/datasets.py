"""The dataset registry: built-in datasets as data (``datasets.json`` beside this module, and the demo), plus those
a user adds in params.yaml, plus ad-hoc folders.

A dataset is a name, a default root (``data/<name>``), its classes (with the folder names that hold them) and text
prompts per class. ``--dataset NAME --root PATH`` with a NAME nobody registered treats PATH as a folder-per-class
dataset whose classes are its folders.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from .config import DatasetDefinition, Params

DATA_ROOT = Path("data")
REGISTERED_DATASETS_FILE = "datasets.json"


@dataclass(frozen=True)
class ClassSpec:
    name: str
    prompts: tuple[str, ...]
    folders: tuple[str, ...] = ()

    def matches(self, folder: str) -> bool:
        return self.matching_name(folder) is not None

    def matching_name(self, folder: str) -> str | None:
        """The key of the name (the class's own or one of its ``folders``) that ``folder`` matches, or None."""
        key = normalise_class_name(folder)
        wanted = {normalise_class_name(self.name), *(normalise_class_name(f) for f in self.folders)}
        return key if key in wanted else None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    modality: str
    classes: tuple[ClassSpec, ...] = field(default_factory=tuple)
    registered: bool = True
    # Folders under the root that hold no class (the demo keeps its ground-truth lesion masks there).
    ignore_folders: tuple[str, ...] = ()

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def with_root(self, root: Path) -> "DatasetSpec":
        return replace(self, root=Path(root))

    def with_classes(self, classes: tuple[ClassSpec, ...]) -> "DatasetSpec":
        return replace(self, classes=classes)


def normalise_class_name(name: str) -> str:
    """The key folder and class names are compared by: 'Viral Pneumonia', 'viral_pneumonia' and 'VIRAL-PNEUMONIA' have
    one key. Letters beyond ASCII are kept ('Tumör', 'Tumør' and 'tumor' are three keys); the Unicode forms of one
    text (composed or decomposed 'ö') and case are folded. A key is for comparing only: a class keeps its own name."""
    text = unicodedata.normalize("NFKC", name).casefold()
    return re.sub(r"[\W_]+", "_", text).strip("_")


def class_file_key(name: str) -> str:
    """An ASCII-safe stand-in for a class name, for where a file name needs one: the name itself when it is only ASCII
    letters, digits, '_', '-' and '.', otherwise its ASCII transliteration followed by 8 hex digits of the name's
    sha256, so that two classes ('Tumör', 'Tumør') never share one."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        return name
    ascii_text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_text).strip("_")[:40] or "class"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def generic_prompts(class_name: str, modality: str) -> tuple[str, ...]:
    words = class_name.replace("_", " ")
    return (
        f"a {modality} showing {words}",
        f"a {modality} of a patient with {words}",
        f"a medical image of {words}",
        f"{words}",
    )


def _registered_definitions() -> dict[str, DatasetDefinition]:
    """The registered datasets' modality, classes, folder names and prompts: package data (datasets.json), so that
    prompts are edited in one file; each entry is validated like a ``custom_datasets`` entry of params.yaml."""
    text = resources.files("medfocus.pipeline").joinpath(REGISTERED_DATASETS_FILE).read_text(encoding="utf-8")
    return {name: DatasetDefinition.model_validate({"root": str(DATA_ROOT / name), **entry})
            for name, entry in json.loads(text).items()}


def _builtin() -> dict[str, DatasetSpec]:
    from .demo import DEMO_CLASSES, DEMO_PROMPTS

    specs = {name: _from_definition(name, definition) for name, definition in _registered_definitions().items()}
    # The demo's prompts stay beside the generator that draws what they describe.
    specs["demo"] = DatasetSpec("demo", DATA_ROOT / "demo", "synthetic ultrasound",
                                tuple(ClassSpec(name, tuple(DEMO_PROMPTS[name])) for name in DEMO_CLASSES),
                                ignore_folders=("lesion_masks",))
    return specs


def _from_definition(name: str, definition: DatasetDefinition) -> DatasetSpec:
    classes = tuple(
        ClassSpec(c.name, tuple(c.prompts) or generic_prompts(c.name, definition.modality), tuple(c.folders))
        for c in definition.classes
    )
    return DatasetSpec(name, Path(definition.root), definition.modality, classes,
                       ignore_folders=tuple(definition.ignore_folders))


def registry(params: Params | None = None) -> dict[str, DatasetSpec]:
    """Built-in datasets, overridden or extended by ``custom_datasets`` in params.yaml."""
    specs = _builtin()
    if params is not None:
        for name, definition in params.custom_datasets.items():
            specs[name] = _from_definition(name, definition)
    return specs


class UnknownDatasetError(ValueError):
    pass


def resolve_dataset(name: str, root: str | Path | None = None, params: Params | None = None) -> DatasetSpec:
    """The spec for ``name``; ``root`` overrides its default root. An unregistered name needs a root (ad hoc)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UnknownDatasetError(f"dataset name {name!r}: use letters, digits, '_', '-', '.' (it names a cache folder)")
    specs = registry(params)
    if name in specs:
        spec = specs[name]
        return spec.with_root(Path(root)) if root is not None else spec
    if root is None:
        known = ", ".join(sorted(specs))
        raise UnknownDatasetError(
            f"unknown dataset {name!r}: registered are {known}; for your own folder-per-class data pass --root PATH "
            "(or add it under custom_datasets in params.yaml)"
        )
    return DatasetSpec(name, Path(root), "medical image", (), registered=False)
