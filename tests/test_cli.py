"""Every CLI option means one thing in every command that has it, and reaches the params key it names."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from medfocus.stages.cli import app

COMMANDS = typer.main.get_command(app).commands


def _options(flag: str) -> dict:
    """Per command, its option spelled ``flag``."""
    return {name: option for name, command in COMMANDS.items()
            for option in command.params if option.param_type_name == "option" and flag in option.opts}


def test_model_is_the_image_encoder_wherever_it_appears():
    options = _options("--model")
    assert {"features", "train", "evaluate", "predict", "report"} <= set(options)
    for name, option in options.items():
        assert "features.model" in option.help, name
    assert set(_options("--head")) == {"predict"}  # a saved head has its own option


@pytest.mark.parametrize(("flag", "meaning"), [
    ("--shots", "images per class"),
    ("--fraction", "fraction"),
    ("--seed", "training seed"),
    ("--mode", "ROI steering mode"),
])
def test_subset_and_mode_options_have_one_meaning(flag, meaning):
    for name, option in _options(flag).items():
        # Each takes a value (evaluate takes it repeated): no command has a bare switch of the same name.
        assert meaning.lower() in option.help.lower() and not option.is_flag, (name, option.help)
    # prepare's test-split seed is another seed than the subsets' and has its own name.
    assert "prepare" not in _options("--seed") and "prepare" in _options("--split-seed")


def test_store_root_is_where_every_store_is():
    options = _options("--store-root")
    assert {"segment", "features", "show-masks", "train", "evaluate", "predict", "report"} <= set(options)
    assert len({option.help for option in options.values()}) == 1


@pytest.fixture
def captured(monkeypatch):
    """Replace the stage functions by recorders of the params they are called with."""
    seen: dict = {}

    def recorder(stage: str, result):
        def record(spec, params, paths, *args, **kwargs):
            seen[stage] = (params, args)
            return result
        return record

    import medfocus.stages.evaluate
    import medfocus.stages.predict
    import medfocus.stages.train

    monkeypatch.setattr(medfocus.stages.train, "train", recorder("train", {}))
    monkeypatch.setattr(medfocus.stages.evaluate, "evaluate", recorder("evaluate", {"results": [], "weights_source": "x", "random_init": False}))
    monkeypatch.setattr(medfocus.stages.predict, "predict", recorder("predict", []))
    return seen


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_options_reach_their_params(captured, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {method: medfocus}\n")  # medfocus_dual (the repository's choice) needs mode dual
    common = ["--dataset", "knee", "--root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--store-root", str(tmp_path / "stores"),
              "--model", "litemedsam", "--params", str(params)]
    _invoke("train", *common, "--shots", "2", "--seed", "1", "--mode", "none")
    _invoke("evaluate", *common, "--shots", "1", "--shots", "2", "--seed", "0", "--mode", "none", "--mode", "crop",
            "--fraction", "0.5", "--method", "linear_probe", "--scheduler", "local-cluster:3", "--workers", "3", "-q")
    _invoke("predict", str(tmp_path / "image.png"), *common, "--head", str(tmp_path / "head.pt"), "--mode", "crop")

    train, _ = captured["train"]
    assert (train.train.shots, train.train.seed, train.train.mode) == (2, 1, "none")
    evaluate, _ = captured["evaluate"]
    assert (evaluate.evaluate.shots, evaluate.evaluate.seeds, evaluate.evaluate.modes, evaluate.evaluate.fractions,
            evaluate.evaluate.methods) == ([1, 2], [0], ["none", "crop"], [0.5], ["linear_probe"])
    assert (evaluate.evaluate.scheduler, evaluate.evaluate.workers) == ("local-cluster:3", 3)
    predict, (images, head) = captured["predict"]
    assert predict.train.mode == "crop" and head == tmp_path / "head.pt"
    for params, _ in captured.values():
        assert params.features.model == "litemedsam"
        assert params.segment.store_root == params.features.store_root == str(tmp_path / "stores")


def test_a_bad_option_value_is_one_line_naming_the_key(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "knee", "--root", str(tmp_path), "--cache-dir", str(tmp_path),
                                      "--mode", "halo"])
    assert result.exit_code == 2 and "evaluate.modes" in result.output and "Traceback" not in result.output


# --- errors a user can fix: one line, exit 2, no traceback -------------------------------------------------------------


def test_a_bad_option_value_names_the_option_not_the_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare: {test_fraction: 0.2}\n")
    result = CliRunner().invoke(app, ["prepare", "-d", "demo", "--root", str(tmp_path / "data"), "--params",
                                      str(tmp_path / "params.yaml"), "--cache-dir", str(tmp_path / "cache"),
                                      "--test-fraction", "1.5"])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "option --test-fraction 1.5" in result.output and "params.yaml" not in result.output
    # A bad value in the file still names the file and its key.
    (tmp_path / "params.yaml").write_text("prepare: {test_fraction: 1.5}\n")
    result = CliRunner().invoke(app, ["prepare", "-d", "demo", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and f"{tmp_path / 'params.yaml'}: prepare.test_fraction = 1.5" in result.output


def test_params_pointing_at_a_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "-d", "demo", "--params", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output and "Traceback" not in result.output


def test_an_unusable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for number in range(2):
            Image.new("L", (32, 32), 60 * number + 100 * (name == "b")).save(tmp_path / "data" / name / f"{number}.png")
    result = CliRunner().invoke(app, ["prepare", "-d", "mine", "--root", str(tmp_path / "data"),
                                      "--cache-dir", str(blocker / "cache")])
    assert result.exit_code == 2, result.output
    assert str(blocker) in result.output and "--cache-dir" in result.output and "Traceback" not in result.output
