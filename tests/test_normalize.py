"""Normalization: formulas per source, round trips, and where the statistics are found."""

from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoints import write_checkpoint
from flashrt.config import NormalizationConfig
from flashrt.errors import CheckpointError, ConfigError
from flashrt.normalize import affine, load

S = {"mean": np.array([1.0, -2.0]), "std": np.array([2.0, 0.5]), "q01": np.array([-1.0, 3.0]), "q99": np.array([3.0, 3.0])}


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
@pytest.mark.parametrize("style", ["openpi", "lerobot"])
def test_round_trip_and_passthrough(mode, style):
    x = np.array([0.3, 5.0, 42.0])  # the third dim has no statistics: it passes through
    y = affine(S, mode, style, 3, inverse=False)(x)
    back = affine(S, mode, style, 3, inverse=True)(y)
    np.testing.assert_allclose(back, x, rtol=1e-5)
    assert y[2] == np.float32(42.0)


def test_formulas():
    x = np.array([0.3, 3.0])
    np.testing.assert_allclose(affine(S, "mean_std", "openpi", 2, False)(x), (x - S["mean"]) / (S["std"] + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(affine(S, "mean_std", "lerobot", 2, False)(x), (x - S["mean"]) / (S["std"] + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(affine(S, "quantile", "openpi", 2, False)(x),
                               (x - S["q01"]) / (S["q99"] - S["q01"] + 1e-6) * 2 - 1, rtol=1e-5)
    # LeRobot substitutes 1e-8 where q99 == q01 (the second dim here).
    lr = affine(S, "quantile", "lerobot", 2, False)(x)
    np.testing.assert_allclose(lr, [2 * (0.3 + 1) / 4 - 1, -1.0], rtol=1e-6)


def test_missing_statistics():
    with pytest.raises(CheckpointError, match=r"quantile normalization needs statistics \['q01', 'q99'\]"):
        affine({"mean": [0.0], "std": [1.0]}, "quantile", "openpi", 2, False)


def test_sources(tmp_path):
    lr = tmp_path / "lr"
    write_checkpoint(lr, "pi05", "lerobot")
    n = load(NormalizationConfig(), lr, "pi05", {"STATE": "QUANTILES", "ACTION": "QUANTILES"}, 8, 7)
    assert "LeRobot" in n.source
    n = load(NormalizationConfig(), lr, "pi05", {"STATE": "MEAN_STD", "ACTION": "IDENTITY"}, 8, 7)
    np.testing.assert_array_equal(n.actions.scale, np.ones(7))
    with pytest.raises(CheckpointError, match="normalization mode MIN_MAX .* is not supported"):
        load(NormalizationConfig(), lr, "pi05", {"STATE": "MIN_MAX"}, 8, 7)
    op = tmp_path / "op"
    write_checkpoint(op, "pi0", "openpi")
    n = load(NormalizationConfig(), op, "pi0", None, 8, 7)
    assert n.source.endswith("assets/trossen/norm_stats.json")
    # a second asset folder makes the choice ambiguous
    (op / "assets" / "droid").mkdir()
    (op / "assets" / "droid" / "norm_stats.json").write_text((op / "assets/trossen/norm_stats.json").read_text())
    with pytest.raises(ConfigError, match="holds several norm_stats.json .*droid, trossen.*say which one"):
        load(NormalizationConfig(), op, "pi0", None, 8, 7)
    assert load(NormalizationConfig(asset_id="droid"), op, "pi0", None, 8, 7).source.endswith("droid/norm_stats.json")
    with pytest.raises(ConfigError, match="assets/nope/norm_stats.json does not exist"):
        load(NormalizationConfig(asset_id="nope"), op, "pi0", None, 8, 7)
    # no statistics anywhere: identity, and the spec says so
    assert load(NormalizationConfig(), None, "pi0", None, 8, 7).source == "none"


def test_file_and_override(tmp_path):
    f = tmp_path / "norm_stats.json"
    f.write_text(json.dumps({"norm_stats": {"state": {"mean": [1, 1], "std": [2, 2]},
                                            "actions": {"mean": [0, 0], "std": [3, 3]}}}))
    n = load(NormalizationConfig(source=str(f)), None, "pi0", None, 2, 2)
    np.testing.assert_allclose(n.state(np.array([3.0, 3.0])), [1, 1], rtol=1e-5)
    np.testing.assert_allclose(n.actions(np.array([1.0, 1.0])), [3, 3], rtol=1e-5)
    n = load(NormalizationConfig(state={"q01": [0, 0], "q99": [2, 2]}, actions={"q01": [0, 0], "q99": [4, 4]}),
             None, "pi05", None, 2, 2)
    assert n.source == "config"
    np.testing.assert_allclose(n.state(np.array([1.0, 2.0])), [0, 1], atol=1e-5)
    with pytest.raises(ConfigError, match="does not exist"):
        load(NormalizationConfig(source=str(tmp_path / "none.json")), None, "pi0", None, 2, 2)
