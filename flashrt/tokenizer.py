"""Prompt tokenization: PaliGemma's tokenizer (the `tokenizers` library reading tokenizer.json) and
the prompt formats of Pi0 and Pi0.5.

- Pi0 (and Pi0.5 without discrete state): BOS + encode(text + "\\n"), as LeRobot's processors do.
- Pi0.5: BOS + encode("Task: {text}, State: {b1 b2 ...};\\nAction: ") with the normalized state
  digitized into 256 bins over [-1, 1] (openpi `PaligemmaTokenizer`, LeRobot
  `Pi05PrepareStateTokenizerProcessorStep`).
Text is cleaned as openpi does: strip, "_" and "\\n" become spaces (case is kept).

`tokenizer: bytes` selects a built-in byte tokenizer (ids = UTF-8 bytes + 3, BOS 2) for the random
demo models, which have no trained vocabulary; it needs no files and no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CheckpointError, ConfigError

BOS_TOKEN = "<bos>"


class PromptTokenizer:
    def __init__(self, encode: Callable[[str], list[int]], bos: int, name: str):
        self.encode, self.bos, self.name = encode, bos, name

    @staticmethod
    def clean(text: str) -> str:
        return text.strip().replace("_", " ").replace("\n", " ")

    def pi0_prompt(self, text: str) -> list[int]:
        return [self.bos] + self.encode(self.clean(text) + "\n")

    def pi05_prompt(self, text: str, state: np.ndarray) -> list[int]:
        return [self.bos] + self.encode(f"Task: {self.clean(text)}, State: {' '.join(map(str, state_bins(state)))};\nAction: ")


def state_bins(state: np.ndarray) -> np.ndarray:
    """Normalized state in [-1, 1] -> integer bins 0..255 (values below -1 give -1, as in openpi)."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def byte_tokenizer() -> PromptTokenizer:
    return PromptTokenizer(lambda s: [b + 3 for b in s.encode("utf-8")], bos=2, name="bytes")


def _from_json(path: Path) -> PromptTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a plain Exception on bad files
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
    bos = tok.token_to_id(BOS_TOKEN)
    if bos is None:
        raise CheckpointError(f"{path}: tokenizer has no {BOS_TOKEN} token; not a PaliGemma tokenizer")
    return PromptTokenizer(lambda s: tok.encode(s, add_special_tokens=False).ids, bos=bos, name=str(path))


def load(spec: str | None, checkpoint_folder: Path | None) -> PromptTokenizer | None:
    """The configured tokenizer: 'bytes', a tokenizer.json path (or its folder), a Hub id, or None to use
    the checkpoint folder's tokenizer.json if it has one. None means prompts must come as token ids."""
    if spec is None:
        if checkpoint_folder is not None and (checkpoint_folder / "tokenizer.json").exists():
            return _from_json(checkpoint_folder / "tokenizer.json")
        return None
    if spec == "bytes":
        return byte_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return _from_json(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from .checkpoint import resolve

        folder = resolve(spec, patterns=["tokenizer.json", "tokenizer_config.json"])  # not the weights
        if not (folder / "tokenizer.json").exists():
            raise CheckpointError(f"Hub repo {spec!r} has no tokenizer.json")
        return _from_json(folder / "tokenizer.json")
    raise ConfigError(f"tokenizer: {spec!r} is not 'bytes', a tokenizer.json file or folder, or a Hub id")
