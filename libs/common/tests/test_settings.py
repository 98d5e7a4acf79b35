import pytest

from stipple_common.settings import CommonSettings, InvalidSettings, load_settings, to_env


class Example(CommonSettings, frozen=True, kw_only=True):
    port: int = 8080
    ratio: float = 0.5
    enabled: bool = False


def test_defaults_without_environment():
    settings = load_settings(Example, env={})
    assert settings.port == 8080
    assert settings.nats_url == "nats://127.0.0.1:4222"


def test_values_are_converted_from_strings():
    env = {"STIPPLE_PORT": "9000", "STIPPLE_RATIO": "0.25", "STIPPLE_ENABLED": "true", "STIPPLE_NATS_URL": "nats://x:1"}
    settings = load_settings(Example, env=env)
    assert (settings.port, settings.ratio, settings.enabled, settings.nats_url) == (9000, 0.25, True, "nats://x:1")


def test_bad_value_names_the_variable_and_value():
    with pytest.raises(InvalidSettings, match=r"STIPPLE_PORT='eighty'.*Expected `int`"):
        load_settings(Example, env={"STIPPLE_PORT": "eighty"})


def test_to_env_round_trips():
    settings = load_settings(Example, env={"STIPPLE_PORT": "1", "STIPPLE_ENABLED": "true"})
    assert load_settings(Example, env=to_env(settings)) == settings
