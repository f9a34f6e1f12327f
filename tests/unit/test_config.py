"""Config: typed dotted overrides, strict errors naming the key, recipes by name or file, saved config round trip."""

import json
from pathlib import Path

import pytest

from prism_mcore.cli import main
from prism_mcore.config import Config, ConfigError, apply_overrides, load_recipe, save_config, to_dict


def test_overrides_are_typed() -> None:
    config = apply_overrides(
        load_recipe("prism"),
        [
            "align.policy_optim.lr=3e-6",
            "parallel.tensor=2",
            "run.tensorboard=false",
            "rollout.server_urls=http://a:30000,http://b:30000",
            "align.policy_loss.dual_clip=none",
            "rlvr.policy_loss.preset=dapo",
        ],
    )
    assert config.align.policy_optim.lr == 3e-6
    assert config.parallel.tensor == 2
    assert config.run.tensorboard is False
    assert config.rollout.server_urls == ["http://a:30000", "http://b:30000"]
    assert config.align.policy_loss.dual_clip is None
    assert config.rlvr.policy_loss.preset == "dapo"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("align.optim.lr=1e-6", "unknown key 'align.optim.lr': align has no field 'optim' (allowed: advantage_mode"),
        ("parallel.tensor=two", "parallel.tensor: 'two' is not an int"),
        ("model.dtype=fp16", "model.dtype: 'fp16' is not allowed; choose one of 'auto', 'float32', 'bfloat16'"),
        ("run.tensorboard=maybe", "run.tensorboard: 'maybe' is not a bool"),
        ("align=1", "'align' is a section"),
        ("nonsense", "override 'nonsense' must look like section.field=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_released_defaults() -> None:
    config = Config()
    assert (config.align.caption_weight, config.align.cot_weight, config.align.format_penalty) == (0.5, 0.5, 1.5)
    assert config.align.policy_optim.lr == 1e-6 and config.align.score_clip == 10.0
    assert config.align.score_reg_coef == 0.001 and config.warmup.aux_loss_coef == 0.01
    assert (
        config.sft.optim.lr == 1e-5 and config.sft.optim.schedule == "cosine" and config.sft.optim.warmup_ratio == 0.1
    )
    assert config.rollout.n == 16 and config.rlvr.prompts_per_step == 32


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    config = apply_overrides(load_recipe("embedded"), ["rlvr.steps=7", "rollout.top_p=0.7"])
    path = save_config(config, tmp_path / "run" / "config.json")
    assert to_dict(load_recipe(str(path))) == to_dict(config)


def test_json_recipe_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"align": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"^unknown key 'align\.stepz': align has no field 'stepz' \(allowed: "):
        load_recipe(str(path))
    path.write_text(json.dumps({"align": {"steps": {"n": 3}}}))
    with pytest.raises(ConfigError, match=r"^'align\.steps' is a value, not a section$"):
        load_recipe(str(path))


def test_python_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "my_recipe.py"
    path.write_text(
        "from prism_mcore.config.recipes import embedded\n"
        "def recipe():\n    config = embedded()\n    config.rlvr.steps = 3\n    return config\n"
    )
    assert load_recipe(str(path)).rlvr.steps == 3
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_cli_bad_override_prints_one_line_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "align.optim.lr=1e-6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'align.optim.lr'") and "\n" not in err


def test_cli_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--recipe", "embedded", "rollout.n=4"]) == 0
    assert json.loads(capsys.readouterr().out)["rollout"]["n"] == 4


@pytest.mark.parametrize("override", ["model.fp8=delayed", "model.attention_backend=te"])
def test_cli_refuses_settings_that_need_transformer_engine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], override: str
) -> None:
    from prism_mcore import cli
    from prism_mcore.models import backend

    monkeypatch.setattr(backend, "has_transformer_engine", lambda: False)
    monkeypatch.setattr(cli, "_stage_runner", lambda stage: pytest.fail(f"stage {stage} started"))
    assert main(["sft", override]) == 2
    err = capsys.readouterr().err.strip()
    key = override.split("=")[0]
    assert err.startswith(f"error: {key}=") and "transformer-engine" in err and "\n" not in err


def test_cli_refuses_a_warmup_as_long_as_its_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prism_mcore import cli

    monkeypatch.setattr(cli, "_stage_runner", lambda stage: pytest.fail(f"stage {stage} started"))
    recipe = str(Path(__file__).parents[2] / "examples/recipes/qwen3vl_4b_dapo.py")  # 10 DAPO warmup steps
    assert main(["run", "--recipe", recipe, "rlvr.steps=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "error: rlvr.optim.warmup_steps=10 must be below rlvr.steps=10 (the schedule needs steps after its warmup)"
    )
