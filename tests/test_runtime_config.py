"""The deployment config: typed, unknown keys refused, errors naming the file and the key."""

from __future__ import annotations

import pytest
import yaml

from flashrt.config import ModelConfig
from flashrt.errors import ConfigError
from runtime.config import DEFAULT_BIND, load_deployment, parse_deployment
from runtime_fakes import model_dict


def write(tmp_path, data) -> str:
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_demo_config_parses_and_binds_loopback():
    config = load_deployment("configs/demo.yaml")
    assert config.server.binds == ["tcp://127.0.0.1:5555"]
    assert [m.name for m in config.models] == ["demo"]
    engine = config.models[0].engine_config()
    assert type(engine) is ModelConfig and engine.state_dim == 8  # the engine gets exactly its own schema


def test_defaults_are_lan_reachable(tmp_path):
    config = load_deployment(write(tmp_path, {"models": [model_dict()]}))
    assert config.server.binds == [DEFAULT_BIND] == ["tcp://0.0.0.0:5555"]
    assert config.server.admin_token is None and config.server.curve is None


@pytest.mark.parametrize("data, words", [
    ({"models": [model_dict()], "sever": {}}, ["'sever'"]),
    ({"server": {"bind": "http://x"}, "models": [model_dict()]}, ["server.bind", "tcp://"]),
    ({"server": {"max_message_bytes": 10}, "models": [model_dict()]}, ["server.max_message_bytes"]),
    ({"server": {"admin_token": "short"}, "models": [model_dict()]}, ["server.admin_token", "8 characters"]),
    ({"server": {"curve": {"clients": "x"}}, "models": [model_dict()]}, ["server.curve.secret_key", "missing"]),
    ({"models": []}, ["models", "non-empty"]),
    ({"models": [model_dict(), model_dict()]}, ["'demo'", "twice"]),
    ({"models": [model_dict(schedule="edf")]}, ["models[0]", "'schedule'"]),
    ({"models": [model_dict(state_dim=0)]}, ["models[0].state_dim"]),
    ({"models": [model_dict(groot={"video": {"video.x": "nope"}, "state": ["state.a"], "actions": {"a": 7}})]},
     ["models[0].groot.video.video.x", "'nope'"]),
    ({"models": [model_dict(groot={"video": {"video.x": "base_0_rgb"}, "state": ["state.a"], "actions": {"a": 9}})]},
     ["models[0].groot.actions", "action_dim (7)"]),
])
def test_errors_name_file_and_key(tmp_path, data, words):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_deployment(path)
    assert str(e.value).startswith(path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_curve_paths_are_relative_to_the_config_file(tmp_path):
    config = parse_deployment({"server": {"curve": {"secret_key": "keys/server.key_secret", "clients": "clients"}},
                               "models": [model_dict()]}, "x.yaml", base=tmp_path)
    assert config.server.curve.secret_key == str(tmp_path / "keys/server.key_secret")
    assert config.server.curve.clients == str(tmp_path / "clients")
