"""A tiny CLIP text model and byte-level BPE tokenizer in SD's folder layout: one token per word of a small vocabulary
(the mini world's `world.VOCAB`), a random CLIPTextModel; for the mini model and the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..text import BOS, EOS, MAX_LENGTH
from ..weights import published_text_state_dict, save_safetensors


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE: repeatedly merge the lowest-ranked adjacent pair."""
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return word


def tiny_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary in which each of `words` (lower-case letters) is one token.

    Layout as CLIP's: the 256 byte symbols, the same with "</w>" (so any text still tokenizes, letter by letter),
    the merge results in merge order, then `<|startoftext|>` and `<|endoftext|>` last. Merges are added word by word
    (each new merge ranks after all earlier ones, so earlier words keep tokenizing to one token).
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab_list)
    for w in dict.fromkeys(words):  # keep order, drop duplicates
        if not w or w != w.lower() or not w.isalpha() or not w.isascii():
            raise ValueError(f"tiny vocabulary words must be lower-case ASCII letters, got {w!r}")
        while True:
            pieces = _bpe(tuple(w[:-1]) + (w[-1] + "</w>",), ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                seen.add(pair[0] + pair[1])
                vocab_list.append(pair[0] + pair[1])
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def write_tiny_text_model(
    folder: str | os.PathLike,
    words: Sequence[str],
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
) -> Path:
    """Write `folder/tokenizer/` (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, as SD v1-4
    ships them) and `folder/text_encoder/` (config.json, model.safetensors) for a small random CLIPTextModel.

    Deterministic: the same words and seed give the same files. Each word is one token. Returns `folder`.
    """
    folder = Path(folder)
    vocab, merges = tiny_bpe(words)
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (tok / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (tok / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        **special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer",
    }, indent=2) + "\n")

    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size,
        projection_dim=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    # Written by hand rather than with save_pretrained: transformers 5 drops the "text_model." prefix when saving,
    # while the published SD v1-4 file (and transformers 4) name every tensor "text_model.…": keep those names.
    te = folder / "text_encoder"
    te.mkdir(parents=True, exist_ok=True)
    config.architectures = ["CLIPTextModel"]
    config.to_json_file(str(te / "config.json"))
    save_safetensors(published_text_state_dict(model.state_dict()), te / "model.safetensors", metadata={"format": "pt"})
    return folder
