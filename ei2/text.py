"""The text encoder of Stable Diffusion v1: transformers' CLIPTextModel (CLIP ViT-L/14's text tower) and its tokenizer.

SD conditions the UNet on `last_hidden_state` of 77 tokens: `<|startoftext|>`, the prompt's BPE tokens, then
`<|endoftext|>` repeated up to 77 (SD v1-4's tokenizer pads with the end token, id 49407); longer prompts are cut to
77 tokens, the last one being `<|endoftext|>`. No attention mask is passed (SD v1 never did); the empty prompt "" is
the unconditional context.

`write_tiny_text_model` writes a small random text model and CLIP BPE tokenizer in SD's folder layout, for tests and
the demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .checkpoint import SINGLE_FILE, load_exact, read_state_dict, save_safetensors
from .convert import compvis_text_key_map, from_compvis
from .errors import Ei2Error
from .files import first_line

MAX_LENGTH = 77
PUBLISHED_PREFIX = "text_model."
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_ENCODER_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# other weight names transformers' from_pretrained reads as well (older SD downloads ship pytorch_model.bin)
_OTHER_WEIGHTS = ("pytorch_model.bin",)


def vit_l14_text_config():
    """SD v1's text encoder config (CLIP ViT-L/14 text model), as in the published text_encoder/config.json."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
        # the published config carries these old placeholder ids; they only matter for the pooled output, unused here
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _files_hint(path: Path) -> str:
    te = ", ".join(f"text_encoder/{f}" for f in TEXT_ENCODER_FILES)
    tok = ", ".join(f"tokenizer/{f}" for f in TOKENIZER_FILES)
    return f"an SD v1-4 folder needs {te} and {tok} under {path}; see weights/README.md"


def _tokenizer_folder(path: Path) -> Path:
    """`path` itself when it holds vocab.json, else `path/tokenizer` (so an SD folder or its tokenizer/ both work)."""
    return path if (path / "vocab.json").is_file() or not (path / "tokenizer").is_dir() else path / "tokenizer"


def load_tokenizer(folder: str | os.PathLike):
    """CLIPTokenizer from a tokenizer folder (or an SD folder holding tokenizer/), offline."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_folder(Path(folder))
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise Ei2Error(
            f"tokenizer incomplete: {', '.join(str(folder / f) for f in missing)} not found; a CLIP tokenizer folder "
            f"holds {', '.join(TOKENIZER_FILES)} (SD v1-4's tokenizer/); see weights/README.md"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise Ei2Error(f"could not read the tokenizer in {folder} ({first_line(e)}); re-download it") from None


class TextEncoder(nn.Module):
    """CLIP text model + tokenizer. `encode(prompts)` -> (b, 77, hidden) context for the UNet's cross-attention."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(model.config.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tokenizer: str | os.PathLike | None = None,
        config=None,
    ) -> "TextEncoder":
        """Load from an SD folder (`path/text_encoder`, `path/tokenizer`) or a single-file CompVis checkpoint.

        A single file holds no tokenizer: pass `tokenizer=` (a tokenizer folder, or an SD folder holding tokenizer/).
        Its text encoder is SD v1's CLIP ViT-L/14 text model unless `config` (a CLIPTextConfig) says otherwise.
        `tokenizer=` also overrides the tokenizer of a folder.
        """
        path = Path(path)
        if path.is_file():
            return cls._from_single_file(path, dtype, device, tokenizer, config)
        if not path.is_dir():
            raise Ei2Error(f"model not found at {path}: {_files_hint(path)}, or pass a single-file checkpoint")
        te = path / "text_encoder"
        missing = [te / "config.json"] if not (te / "config.json").is_file() else []
        if not any((te / f).is_file() for f in TEXT_ENCODER_FILES[1:] + _OTHER_WEIGHTS):
            missing.append(te / "model.safetensors")
        tok_dir = Path(tokenizer) if tokenizer is not None else path / "tokenizer"
        if tokenizer is None:
            missing += [tok_dir / f for f in TOKENIZER_FILES if not (tok_dir / f).is_file()]
        if missing:
            raise Ei2Error(f"incomplete model folder: {', '.join(map(str, missing))} not found; {_files_hint(path)}")

        from transformers import CLIPTextModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # ei2 prints its own progress; transformers' load bar is noise on stderr
        try:
            # dtype is applied after loading: transformers 4 calls the argument torch_dtype and 5 calls it dtype
            model, info = CLIPTextModel.from_pretrained(str(te), local_files_only=True, output_loading_info=True)
        except Exception as e:
            raise Ei2Error(f"could not load the text encoder in {te} ({first_line(e)}); re-download it") from None
        # from_pretrained only warns about tensors the file lacks and initialises them at random: refuse instead
        if info.get("missing_keys") or info.get("mismatched_keys"):
            bad = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
            raise Ei2Error(
                f"{te} does not match its config.json ({len(bad)} missing or mis-shaped tensors: "
                f"{', '.join(map(str, bad[:5]))}); re-download the text encoder"
            )
        return cls(model.to(dtype), load_tokenizer(tok_dir)).to(device)

    @classmethod
    def _from_single_file(cls, path: Path, dtype, device, tokenizer, config) -> "TextEncoder":
        if path.suffix.lower() not in SINGLE_FILE:
            raise Ei2Error(f"{path} is not a model folder or a .safetensors/.ckpt checkpoint")
        if tokenizer is None:
            raise Ei2Error(
                f"{path} is a single-file checkpoint, which carries no tokenizer: pass tokenizer=<SD folder's "
                "tokenizer/> (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json); "
                "see weights/README.md"
            )
        tok = load_tokenizer(tokenizer)  # check the tokenizer before reading a multi-GB file
        from transformers import CLIPTextModel

        config = config if config is not None else vit_l14_text_config()
        weights = from_compvis(read_state_dict(path), compvis_text_key_map(config.num_hidden_layers), str(path))
        model = CLIPTextModel(config)
        load_exact(model, to_model_keys(model, weights), str(path))
        return cls(model.to(dtype), tok).to(device)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(b, 77) token ids: bos, prompt tokens, eos padding; truncated to 77 (ending in eos) as SD does."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.long()

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(b, 77, hidden) last_hidden_state, on the model's device and in its dtype."""
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)


# --- A tiny text model in SD's folder layout (tests, demo) --------------------------------------------------------


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
    from transformers import CLIPTextConfig, CLIPTextModel

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


def published_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under the published names (`text_model.…`, as SD v1-4's file and transformers 4),
    whichever transformers version made it; the non-persistent position_ids buffer is left out."""
    return {
        (k if k.startswith(PUBLISHED_PREFIX) else PUBLISHED_PREFIX + k): v
        for k, v in state_dict.items()
        if not k.endswith("embeddings.position_ids")
    }


def to_model_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename published `text_model.…` keys to what this transformers version's CLIPTextModel calls them
    (transformers 5 has no `text_model` submodule). Keys that fit neither way are passed through unchanged."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        short = k.removeprefix(PUBLISHED_PREFIX)
        candidates = (k, short, PUBLISHED_PREFIX + short)
        out[next((c for c in candidates if c in own), k)] = v
    return out

