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
    assert (config.server.publish_bind, config.server.observe_bind) == ("tcp://0.0.0.0:5556", "tcp://0.0.0.0:5557")
    assert config.server.scheduler_depth == 2


def test_schedule_defaults_and_realtime():
    """No schedule: best effort on request. A deadline makes a model real time unless it says otherwise."""
    [plain, rt, periodic, slow] = parse_deployment({"models": [
        model_dict("plain"),
        model_dict("rt", schedule={"priority": 2, "deadline_ms": 30}),
        model_dict("cam", schedule={"trigger": "periodic", "period_ms": 50, "deadline_ms": 40}),
        model_dict("slow", schedule={"deadline_ms": 500, "realtime": False}),
    ]}, "x.yaml").models
    assert plain.schedule.describe() == {"trigger": "request", "priority": 0, "deadline_ms": None,
                                         "period_ms": None, "realtime": False}
    assert rt.schedule.is_realtime and rt.schedule.priority == 2 and not rt.schedule.periodic
    assert periodic.schedule.periodic and periodic.schedule.period_ms == 50.0 and periodic.schedule.is_realtime
    assert not slow.schedule.is_realtime
    assert "schedule" not in vars(rt.engine_config())  # the engine never sees the runtime's keys


def test_example_configs_parse():
    multi = load_deployment("configs/multi_model.yaml")
    by_name = {m.name: m.schedule for m in multi.models}
    assert [s.trigger for s in by_name.values()] == ["periodic", "periodic", "request"]
    rt = [s for s in by_name.values() if s.priority > 0]
    assert len(rt) == 1 and rt[0].period_ms == 50 and rt[0].deadline_ms == 30 and rt[0].is_realtime
    assert load_deployment("configs/demo.yaml").models[0].schedule.trigger == "request"


@pytest.mark.parametrize("data, words", [
    ({"models": [model_dict()], "sever": {}}, ["'sever'"]),
    ({"server": {"bind": "http://x"}, "models": [model_dict()]}, ["server.bind", "tcp://"]),
    ({"server": {"max_message_bytes": 10}, "models": [model_dict()]}, ["server.max_message_bytes"]),
    ({"server": {"admin_token": "short"}, "models": [model_dict()]}, ["server.admin_token", "8 characters"]),
    ({"server": {"curve": {"clients": "x"}}, "models": [model_dict()]}, ["server.curve.secret_key", "missing"]),
    ({"models": []}, ["models", "non-empty"]),
    ({"models": [model_dict(), model_dict()]}, ["'demo'", "twice"]),
    ({"models": [model_dict(schedul={})]}, ["models[0]", "'schedul'"]),
    ({"models": [model_dict(schedule="edf")]}, ["models[0].schedule", "mapping"]),
    ({"models": [model_dict(schedule={"trigger": "cron"})]}, ["models[0].schedule.trigger", "'periodic'"]),
    ({"models": [model_dict(schedule={"trigger": "periodic"})]}, ["models[0].schedule.period_ms", "required"]),
    ({"models": [model_dict(schedule={"period_ms": 50})]}, ["models[0].schedule.period_ms", "unless trigger is periodic"]),
    ({"models": [model_dict(schedule={"deadline_ms": -5})]}, ["models[0].schedule.deadline_ms", "> 0"]),
    ({"models": [model_dict(schedule={"priority": "high"})]}, ["models[0].schedule.priority", "an int"]),
    ({"models": [model_dict(schedule={"deadline": 30})]}, ["models[0].schedule.deadline", "deadline_ms"]),
    ({"server": {"publish_bind": "udp://x"}, "models": [model_dict()]}, ["server.publish_bind", "tcp://"]),
    ({"server": {"observe_bind": "tcp://0.0.0.0:5556"}, "models": [model_dict()]},
     ["server.observe_bind", "other than publish_bind"]),
    ({"server": {"bind": "tcp://0.0.0.0:5557"}, "models": [model_dict()]}, ["server.observe_bind", "server.bind"]),
    ({"server": {"scheduler_depth": 0}, "models": [model_dict()]}, ["server.scheduler_depth", "1..8"]),
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
