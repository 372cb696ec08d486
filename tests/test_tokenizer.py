"""Prompt formats and tokenizer loading."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from flashrt.errors import CheckpointError, ConfigError
from flashrt.tokenizer import PromptTokenizer, byte_tokenizer, load, state_bins


def recording():
    seen = []
    return PromptTokenizer(lambda s: seen.append(s) or [7], bos=2, name="rec"), seen


def test_pi05_prompt_format():
    tok, seen = recording()
    ids = tok.pi05_prompt("  pick_up the\ncube ", np.array([-1.0, 0.0, 0.999, -2.0]))
    assert ids == [2, 7]
    assert seen == ["Task: pick up the cube, State: 0 128 255 -1;\nAction: "]


def test_pi0_prompt_format():
    tok, seen = recording()
    assert tok.pi0_prompt("Open_Drawer") == [2, 7]
    assert seen == ["Open Drawer\n"]


def test_state_bins_match_openpi():
    s = np.linspace(-1.2, 1.2, 97)
    np.testing.assert_array_equal(state_bins(s), np.digitize(s, np.linspace(-1, 1, 257)[:-1]) - 1)


def test_byte_tokenizer():
    t = byte_tokenizer()
    assert t.pi0_prompt("hi") == [2, ord("h") + 3, ord("i") + 3, ord("\n") + 3]


def write_tokenizer(path, with_bos=True):
    vocab = {"<pad>": 0, "<eos>": 1, "[UNK]": 3, "pick": 4, "up": 5, "Task:": 6}
    if with_bos:
        vocab["<bos>"] = 2
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(path))


def test_tokenizer_json(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    tok = load(str(tmp_path), None)
    assert tok.pi0_prompt("pick up") == [2, 4, 5]
    assert load(None, tmp_path).bos == 2  # found in the checkpoint folder
    assert load(None, tmp_path / "elsewhere") is None


def test_tokenizer_errors(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json", with_bos=False)
    with pytest.raises(CheckpointError, match="has no <bos> token"):
        load(str(tmp_path / "tokenizer.json"), None)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        load(str(tmp_path / "bad.json"), None)
    with pytest.raises(ConfigError, match="is not 'bytes', a tokenizer.json file or folder, or a Hub id"):
        load("./missing/tokenizer.json", None)
