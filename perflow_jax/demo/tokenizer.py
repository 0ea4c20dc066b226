"""A tiny CLIP BPE tokenizer: single characters (and a few merges) as its vocabulary.

The demo teacher and the tests use it where a real CLIP vocabulary (49408 tokens, a download)
would be needed: it reads and writes the same ``vocab.json`` / ``merges.txt`` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (as in its BPE tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer(folder: Path) -> transformers.CLIPTokenizer:
    """Write ``vocab.json`` and ``merges.txt`` (519 tokens) into ``folder``; the tokenizer reading them."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["a t</w>", "p h", "ph o", "o t", "ot o</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
