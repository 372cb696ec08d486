"""Model config parsing: every error names the file, the key and what was expected."""

from __future__ import annotations

import pytest

from flashrt.config import ModelConfig, load_model_config, parse
from flashrt.errors import ConfigError

GOOD = dict(name="m", kind="pi05", checkpoint="random", cameras=["a", {"name": "b", "optional": True}],
            state_dim=8, action_dim=7)


def write(tmp_path, text):
    p = tmp_path / "model.yaml"
    p.write_text(text)
    return p


def test_parses_a_good_config():
    cfg = parse(ModelConfig, GOOD, "x")
    assert cfg.cameras[0].name == "a" and not cfg.cameras[0].optional and cfg.cameras[1].optional
    assert cfg.precision == "auto" and cfg.random.size == "tiny" and cfg.normalization.source == "auto"


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "x.colour: unknown key 'colour'"),
    ({"state_dim": "8"}, "x.state_dim: expected an int, got '8'"),
    ({"state_dim": True}, "x.state_dim: expected an int, got True"),
    ({"kind": "pi1"}, "x.kind: expected one of 'pi0' | 'pi05', got 'pi1'"),
    ({"precision": "int4"}, "x.precision: expected one of"),
    ({"action_horizon": 0}, "x.action_horizon: expected an int in 1..256, got 0"),
    ({"state_dim": 33}, "x.state_dim: expected an int in 1..32, got 33"),
    ({"cameras": []}, "x.cameras: expected at least one camera"),
    ({"cameras": ["a", "a"]}, "x.cameras: expected unique camera names"),
    ({"cameras": [{"name": "a", "optional": True}]}, "not optional"),
    ({"cameras": [{"name": "a", "zoom": 2}]}, "x.cameras[0].zoom: unknown key"),
    ({"random": {"size": "huge"}}, "x.random.size: expected one of"),
    ({"prompt_buckets": [64, 32]}, "x.prompt_buckets: expected increasing positive ints"),
    ({"max_prompt_tokens": 48, "prompt_buckets": [32, 64]}, "a last bucket equal to max_prompt_tokens (48)"),
    ({"device": "tpu"}, "x.device: expected 'auto', 'cpu' or 'cuda[:N]'"),
    ({"kind": "pi0", "discrete_state": True}, "x.discrete_state: only Pi0.5"),
    ({"normalization": {"state": {"mean": [0.0]}}}, "x.normalization.state: expected keys {mean, std} or {q01, q99}"),
    ({"normalization": {"state": {"mean": [0.0], "std": [1.0, 2.0]}}}, "expected lists of one length"),
])
def test_bad_values_are_named(change, message):
    with pytest.raises(ConfigError) as e:
        parse(ModelConfig, {**GOOD, **change}, "x")
    assert message in str(e.value)


def test_missing_required_key():
    bad = dict(GOOD)
    del bad["state_dim"]
    with pytest.raises(ConfigError, match=r"x.state_dim: required key is missing \(expected an int\)"):
        parse(ModelConfig, bad, "x")


def test_yaml_errors_name_the_file(tmp_path):
    p = write(tmp_path, "name: m\nkind: pi05\ncheckpoint: random\ncameras: [a]\nstate_dim: 8\naction_dim: 7\nzoom: 1\n")
    with pytest.raises(ConfigError, match=f"{p}.zoom: unknown key"):
        load_model_config(p)
    p = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{p}: not valid YAML"):
        load_model_config(p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_model_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_model_config(p)


def test_deployment_file_with_models_list(tmp_path):
    body = "\n".join(f"  - {{name: {n}, kind: pi0, checkpoint: random, cameras: [a], state_dim: 8, action_dim: 7}}"
                     for n in ("one", "two"))
    p = write(tmp_path, "server: {}\nmodels:\n" + body + "\n")
    assert load_model_config(p, "two").name == "two"
    with pytest.raises(ConfigError, match="holds 2 models; say which one"):
        load_model_config(p)
    with pytest.raises(ConfigError, match="no model named 'three'"):
        load_model_config(p, "three")
    p = write(tmp_path, "models:\n  - {name: one, kind: pi0, checkpoint: random, cameras: [a], state_dim: 8}\n")
    with pytest.raises(ConfigError, match=r"models\[0\].action_dim: required key is missing"):
        load_model_config(p)
