"""params.yaml is validated: unknown keys and bad values are refused with the key and the value named."""

from __future__ import annotations

import pytest

from medfocus.pipeline.config import ConfigError, load_params, parse_params


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params()
    assert list(params.datasets) == ["demo"] and params.datasets["demo"].root == "data/demo"
    assert params.prepare.test_fraction == 0.2
    assert params.segment.backend == "litemedsam"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("segment:\n  backnd: sam2\n")
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert "segment.backnd" in str(caught.value) and "sam2" in str(caught.value)


@pytest.mark.parametrize(
    ("yaml_text", "key", "value"),
    [
        ("prepare:\n  test_fraction: 1.5\n", "prepare.test_fraction", "1.5"),
        ("segment:\n  backend: sam3\n", "segment.backend", "sam3"),
        ("features:\n  modes: [none, halo]\n", "features.modes", "halo"),
        ("segment:\n  scheduler: carrier-pigeon\n", "segment.scheduler", "carrier-pigeon"),
        ("prepare:\n  fractions: [0.05, 2]\n", "prepare.fractions", "2"),
        ("segment:\n  chunk_size: zero\n", "segment.chunk_size", "zero"),
        ("segment:\n  sam2_image_size: 500\n", "segment.sam2_image_size", "500"),
        ("segment:\n  policy: dark_blob\n", "segment.policy", "dark_blob"),
        ("segment:\n  device: gpu\n", "segment.device", "gpu"),
        ("features:\n  device: cuda:one\n", "features.device", "cuda:one"),
        ("features:\n  model: ViT-B-23\n", "features.model", "ViT-B-23"),
        ("features:\n  attention_layers: last four\n", "features.attention_layers", "last four"),
    ],
)
def test_bad_values_name_key_and_value(tmp_path, yaml_text, key, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert key in str(caught.value) and value in str(caught.value)


def test_sam2_input_size_reaches_the_segmenter_and_the_generator_keeps_its_native_size():
    from medfocus.pipeline.specs import resolve_segment

    # allow_random_init: no SAM2 weights are needed to see which options the segmenter is built with.
    params = parse_params({"segment": {"backend": "sam2", "sam2_image_size": 512, "allow_random_init": True}})
    segmenter = resolve_segment(params.segment, "covid")
    assert segmenter.build_options["image_size"] == 512 and segmenter.content["model"]["image_size"] == 512
    with pytest.raises(ConfigError, match="sam2_image_size 512 needs sam2_mode 'prompted'"):
        parse_params({"segment": {"backend": "sam2", "sam2_mode": "auto", "sam2_image_size": 512}})


def test_overrides_win_and_are_validated():
    params = parse_params({"segment": {"backend": "sam2"}}, overrides={"segment.backend": "litemedsam", "prepare.seed": None})
    assert params.segment.backend == "litemedsam"
    with pytest.raises(ConfigError, match="prepare.test_fraction"):
        parse_params({}, overrides={"prepare.test_fraction": 0.0})


def test_custom_dataset_definition(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "custom_datasets:\n  knee:\n    root: data/knee\n    modality: knee X-ray\n"
        "    classes:\n      - {name: healthy}\n      - {name: arthritis, prompts: ['a knee X-ray with osteoarthritis']}\n"
    )
    from medfocus.pipeline.datasets import resolve_dataset

    spec = resolve_dataset("knee", params=load_params(path))
    assert spec.class_names == ["healthy", "arthritis"]
    assert spec.classes[1].prompts == ("a knee X-ray with osteoarthritis",)
    assert any("knee X-ray" in prompt for prompt in spec.classes[0].prompts)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(path)


@pytest.mark.parametrize(
    ("key", "typo", "allowed"),
    [
        ("segment.policy", "dark_blob", ["'auto'", "'whole-image'", "'centre-box'", "'grid-score'", "'dark-blob'", "'demo-lesion'"]),
        ("segment.device", "gpu", ["cpu", "cuda", "cuda:N", "mps"]),
        ("features.device", "cuda0", ["cpu", "cuda", "cuda:N", "mps"]),
        ("features.model", "ViT-B-23", ["auto", "litemedsam", "hf-hub:", "ViT-B-32"]),
        ("features.attention_layers", "6-11", ["'all'", "'8,9,10,11'"]),
    ],
)
def test_enumerated_settings_name_the_allowed_values(key, typo, allowed):
    with pytest.raises(ConfigError) as caught:
        parse_params({}, overrides={key: typo})
    message = str(caught.value)
    assert key in message and repr(typo) in message
    assert all(value in message for value in allowed), message
    assert "Value error" not in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("segment.device", "cuda:1"),
        ("features.device", "mps"),
        ("features.model", "litemedsam"),
        ("features.model", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
        ("features.model", "ViT-B-16"),
        ("features.attention_layers", "-4, -3,-2,-1"),
    ],
)
def test_valid_enumerated_settings_pass(key, value):
    section, name = key.split(".")
    assert getattr(getattr(parse_params({}, overrides={key: value}), section), name) == value


def test_policy_names_in_params_are_the_segmenters_policies():
    """segment.policy takes 'auto', exactly the built-in policies the segmenter knows (the shipped policy files), or
    the path of a policy file."""
    from medfocus.pipeline.segmenters.policies import BUILTIN_POLICY_DIR, POLICIES

    assert set(POLICIES) == {path.stem for path in BUILTIN_POLICY_DIR.glob("*.json")}
    for name in ("auto", *POLICIES):
        assert parse_params({"segment": {"policy": name}}).segment.policy == name
    shipped = str(BUILTIN_POLICY_DIR / "grid-score.json")
    assert parse_params({"segment": {"policy": shipped}}).segment.policy == shipped


def test_registered_datasets_come_from_the_packaged_data_file():
    import json
    from pathlib import Path

    from medfocus.pipeline import datasets

    data_file = Path(datasets.__file__).with_name(datasets.REGISTERED_DATASETS_FILE)
    definitions = json.loads(data_file.read_text(encoding="utf-8"))
    specs = datasets.registry()
    assert set(definitions) | {"demo"} == set(specs)
    for name, definition in definitions.items():
        spec = specs[name]
        assert spec.modality == definition["modality"] and str(spec.root) == f"data/{name}"
        assert [(c.name, list(c.prompts), list(c.folders)) for c in spec.classes] == [
            (c["name"], c["prompts"], c.get("folders", [])) for c in definition["classes"]]
    # A wheel ships the file only when pyproject names it as package data.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert datasets.REGISTERED_DATASETS_FILE in pyproject["tool"]["setuptools"]["package-data"]["medfocus.pipeline"]


def test_train_and_evaluate_default_to_the_modes_features_computes():
    defaults = parse_params({})
    assert defaults.train.mode in defaults.features.modes and defaults.evaluate.modes == defaults.features.modes
    chosen = parse_params({"features": {"modes": ["none", "crop"]}})
    assert (chosen.train.mode, chosen.evaluate.modes) == ("crop", ["none", "crop"])
    assert parse_params({"features": {"modes": ["none"]}}).train.mode == "none"
    # Given values stand, wherever they come from.
    given = parse_params({"features": {"modes": ["none", "crop"]}, "evaluate": {"modes": ["none"]}}, overrides={"train.mode": "none"})
    assert (given.train.mode, given.evaluate.modes) == ("none", ["none"])


def test_custom_dataset_ignores_its_mask_folders(tmp_path):
    from medfocus.pipeline.datasets import resolve_dataset
    from medfocus.pipeline.manifest import DatasetError, discover, match_classes

    from .conftest import write_image

    root = tmp_path / "knee"
    for index, folder in enumerate(("healthy", "arthritis", "masks/arthritis")):
        write_image(root / folder / "a.png", seed=index)
    definition = "custom_datasets:\n  knee:\n    root: {root}\n    classes: [{{name: healthy}}, {{name: arthritis}}]\n"
    path = tmp_path / "params.yaml"

    def folders_and_classes(extra: str = "") -> tuple[list[str], dict[str, str]]:
        path.write_text(definition.format(root=root) + extra)
        spec = resolve_dataset("knee", params=load_params(path))
        _, found, per_class = discover(spec)
        return sorted(entry.folder for entry in found), match_classes(spec, list(per_class))[1]

    with pytest.raises(DatasetError, match="folder 'masks' matches none of its classes.*ignore_folders"):
        folders_and_classes()
    assert folders_and_classes("    ignore_folders: [masks]\n") == (
        ["arthritis", "healthy"], {"healthy": "healthy", "arthritis": "arthritis"})
