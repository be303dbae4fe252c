"""The dataset registry: built-in datasets as data, plus those a user adds in params.yaml, plus ad-hoc folders.

A dataset is a name, a default root (``data/<name>``), its classes (with the folder names that hold them) and text
prompts per class. ``--dataset NAME --root PATH`` with a NAME nobody registered treats PATH as a folder-per-class
dataset whose classes are its folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DatasetDefinition, Params

DATA_ROOT = Path("data")


@dataclass(frozen=True)
class ClassSpec:
    name: str
    prompts: tuple[str, ...]
    folders: tuple[str, ...] = ()

    def matches(self, folder: str) -> bool:
        wanted = {normalise_class_name(self.name), *(normalise_class_name(f) for f in self.folders)}
        return normalise_class_name(folder) in wanted


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
    """'Viral Pneumonia' and 'viral_pneumonia' name the same class."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def generic_prompts(class_name: str, modality: str) -> tuple[str, ...]:
    words = class_name.replace("_", " ")
    return (
        f"a {modality} showing {words}",
        f"a {modality} of a patient with {words}",
        f"a medical image of {words}",
        f"{words}",
    )


def _cls(name: str, prompts: list[str], folders: tuple[str, ...] = ()) -> ClassSpec:
    return ClassSpec(name=name, prompts=tuple(prompts), folders=folders)


def _builtin() -> dict[str, DatasetSpec]:
    from .demo import DEMO_CLASSES, DEMO_PROMPTS

    specs = [
        DatasetSpec("covid", DATA_ROOT / "covid", "chest X-ray", (
            _cls("covid", ["a chest X-ray showing COVID-19 pneumonia",
                           "a chest radiograph with bilateral peripheral ground-glass opacities from COVID-19",
                           "a frontal chest X-ray of a patient with SARS-CoV-2 infection",
                           "a chest X-ray with multifocal patchy consolidation typical of COVID-19"]),
            _cls("normal", ["a normal chest X-ray",
                            "a chest radiograph with clear lungs and no acute findings",
                            "a frontal chest X-ray of healthy lungs",
                            "a chest X-ray without consolidation or effusion"]),
            _cls("viral_pneumonia", ["a chest X-ray showing viral pneumonia",
                                     "a chest radiograph with diffuse interstitial opacities from viral pneumonia",
                                     "a frontal chest X-ray of a patient with non-COVID viral pneumonia",
                                     "a chest X-ray with bilateral perihilar infiltrates of viral pneumonia"]),
        )),
        DatasetSpec("lung_disease", DATA_ROOT / "lung_disease", "chest X-ray", (
            _cls("bacterial_pneumonia", ["a chest X-ray showing bacterial pneumonia",
                                         "a chest radiograph with lobar consolidation from bacterial pneumonia",
                                         "a frontal chest X-ray with a dense focal infiltrate"]),
            _cls("covid", ["a chest X-ray showing COVID-19 pneumonia",
                           "a chest radiograph with bilateral ground-glass opacities from COVID-19",
                           "a frontal chest X-ray of a patient with SARS-CoV-2 infection"],
                 folders=("corona_virus_disease", "covid_19")),
            _cls("normal", ["a normal chest X-ray",
                            "a chest radiograph with clear lungs and no acute findings",
                            "a frontal chest X-ray of healthy lungs"]),
            _cls("tuberculosis", ["a chest X-ray showing pulmonary tuberculosis",
                                  "a chest radiograph with upper lobe cavitation and fibronodular opacities",
                                  "a frontal chest X-ray of a patient with tuberculosis"]),
            _cls("viral_pneumonia", ["a chest X-ray showing viral pneumonia",
                                     "a chest radiograph with diffuse interstitial opacities from viral pneumonia",
                                     "a frontal chest X-ray of a patient with viral pneumonia"]),
        )),
        DatasetSpec("brain_tumor", DATA_ROOT / "brain_tumor", "brain MRI", (
            _cls("glioma_tumor", ["a brain MRI showing a glioma",
                                  "an MRI slice of the brain with an infiltrative intra-axial glioma",
                                  "a brain MRI with an irregular enhancing mass in the cerebral white matter"]),
            _cls("meningioma_tumor", ["a brain MRI showing a meningioma",
                                      "an MRI slice of the brain with an extra-axial dural-based meningioma",
                                      "a brain MRI with a well-circumscribed mass attached to the meninges"]),
            _cls("no_tumor", ["a normal brain MRI without a tumor",
                              "an MRI slice of a healthy brain",
                              "a brain MRI with no mass lesion"]),
            _cls("pituitary_tumor", ["a brain MRI showing a pituitary tumor",
                                     "an MRI slice of the brain with a sellar pituitary adenoma",
                                     "a brain MRI with a mass in the pituitary fossa"]),
        )),
        DatasetSpec("breast_cancer", DATA_ROOT / "breast_cancer", "breast ultrasound", (
            _cls("benign", ["a breast ultrasound showing a benign lesion",
                            "a breast ultrasound image of a well-circumscribed oval hypoechoic mass",
                            "an ultrasound of the breast with a benign fibroadenoma"]),
            _cls("malignant", ["a breast ultrasound showing a malignant tumor",
                               "a breast ultrasound image of an irregular spiculated hypoechoic mass",
                               "an ultrasound of the breast with breast cancer and posterior shadowing"]),
            _cls("normal", ["a normal breast ultrasound",
                            "a breast ultrasound image of normal fibroglandular tissue without a mass",
                            "an ultrasound of a healthy breast"]),
        )),
        DatasetSpec("demo", DATA_ROOT / "demo", "synthetic ultrasound",
                    tuple(_cls(name, list(DEMO_PROMPTS[name])) for name in DEMO_CLASSES),
                    ignore_folders=("lesion_masks",)),
    ]
    return {spec.name: spec for spec in specs}




def _from_definition(name: str, definition: DatasetDefinition) -> DatasetSpec:
    classes = tuple(
        ClassSpec(c.name, tuple(c.prompts) or generic_prompts(c.name, definition.modality), tuple(c.folders))
        for c in definition.classes
    )
    return DatasetSpec(name, Path(definition.root), definition.modality, classes)


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
