from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedlora_common.settings import ConfigError, StrictModel, load_settings


class _Lora(StrictModel):
    rank: int = Field(16, ge=1)


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDLORA_", env_nested_delimiter="__", extra="forbid")
    rounds: int = 3
    lora: _Lora = _Lora()


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("rounds: 4\nlora:\n  rank: 2\n")

    from_file = load_settings(_Settings, ["--config", str(config)], environ={})
    from_env = load_settings(_Settings, ["--config", str(config)], environ={"FEDLORA_LORA__RANK": "9"})
    from_flag = load_settings(
        _Settings, ["--config", str(config), "--lora.rank", "7"], environ={"FEDLORA_LORA__RANK": "9"}
    )

    assert (from_file.rounds, from_file.lora.rank) == (4, 2)
    assert from_env.lora.rank == 9
    assert from_flag.lora.rank == 7


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        ("rounds: 4\nlorax: 1\n", [], "lorax: unknown setting"),
        ("lora:\n  rank: 0\n", [], "lora.rank: Input should be greater than or equal to 1"),
        ("rounds: [1\n", [], "is not valid YAML"),
        ("- 1\n", [], "must be a mapping"),
        ("rounds: 4\n", ["--rounds", "many"], "rounds: Input should be a valid integer"),
        ("rounds: 4\n", ["--bogus", "1"], "unrecognized arguments: --bogus"),
        ("rounds: 4\nlora:\n  rank: 2\nrounds: 8\n", [], "line 4: key 'rounds' is given twice; keep one"),
        ("lora:\n  rank: 2\n  rank: 8\n", [], "line 3: key 'rank' is given twice; keep one"),
    ],
)
def test_bad_configs_give_one_line_naming_the_field(
    tmp_path: Path, content: str, argv: list[str], message: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)

    with pytest.raises(ConfigError) as info:
        load_settings(_Settings, ["--config", str(config), *argv], environ={})

    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(_Settings, ["--config", str(tmp_path / "nope.yaml")], environ={})


class _Required(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDLORA_", env_nested_delimiter="__", extra="forbid")
    base_model: str
    lora: _Lora = _Lora()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "base_modle: tiny\n",
            "base_modle: unknown setting (did you mean base_model?); base_model: Field required",
        ),
        ("base_model: tiny\nlora:\n  rnak: 2\n", "lora.rnak: unknown setting (did you mean rank?)"),
        ("base_model: tiny\nzzz: 1\n", "zzz: unknown setting"),
    ],
)
def test_an_unknown_key_is_named_first_with_the_closest_known_name_and_what_is_missing(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)

    with pytest.raises(ConfigError) as info:
        load_settings(_Required, ["--config", str(config)], environ={})

    assert str(info.value) == message


def test_no_arguments_at_all_asks_for_the_config_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_Required, [], environ={})

    assert str(info.value) == "--config FILE is required"


def test_settings_from_the_environment_alone_need_no_config_file() -> None:
    loaded = load_settings(_Required, [], environ={"FEDLORA_BASE_MODEL": "tiny"})

    assert loaded.base_model == "tiny"


def test_flags_without_a_config_file_say_that_none_was_given() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_Required, ["--lora.rank", "4"], environ={})

    assert str(info.value) == "base_model: Field required (no --config FILE was given)"


def test_config_without_a_file_name_is_one_line_not_an_argparse_exit() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_Required, ["--config"], environ={})

    assert str(info.value) == "argument --config: expected one argument"


def test_a_file_of_the_other_program_is_named_as_such_in_one_short_line(tmp_path: Path) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text("worker_id: a\ntoken_file: t\ncoordinator: c:1\ndata: {}\ndevice: cpu\n")

    with pytest.raises(ConfigError) as info:
        load_settings(_Required, ["--config", str(config)], environ={})

    assert str(info.value) == (
        "worker_id: unknown setting; token_file: unknown setting; coordinator: unknown setting; "
        "2 more unknown settings (is this the other program's file?); base_model: Field required"
    )
