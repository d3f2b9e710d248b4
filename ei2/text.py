"""The text encoder of Stable Diffusion v1: transformers' CLIPTextModel (CLIP ViT-L/14's text tower) and its tokenizer.

SD conditions the UNet on `last_hidden_state` of 77 tokens: `<|startoftext|>`, the prompt's BPE tokens, then
`<|endoftext|>` repeated up to 77 (SD v1-4's tokenizer pads with the end token, id 49407); longer prompts are cut to
77 tokens, the last one being `<|endoftext|>`. No attention mask is passed (SD v1 never did); the empty prompt "" is
the unconditional context.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import Ei2Error, first_line
from .weights import (SINGLE_FILE, TOKENIZER_FILES, check_sd_folder, compvis_text_key_map, from_compvis, load_exact,
                      read_state_dict, to_model_keys)

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's BPE has 49408 tokens and spells any word from pieces it learned; a tokenizer this much smaller is a word list
# (the miniature model's: 512 byte symbols + one token per word), where an unknown word falls apart into letters
SMALL_VOCABULARY = 5000


def known_words(tokenizer) -> list[str]:
    """The whole words (2+ letters) of a word-list tokenizer, in vocabulary order: its tokens `<word></w>`. (In the
    miniature tokenizer every merge extends a word from its front, so only a complete word ends in `</w>`.)"""
    vocab = tokenizer.get_vocab()
    return [t[:-4] for t in sorted(vocab, key=vocab.get) if t.endswith("</w>") and len(t) > 5 and t[:-4].isalpha()]


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` (lower-cased, once each) that a small word-list vocabulary (`SMALL_VOCABULARY`) does not
    hold as one token; always [] for CLIP's full vocabulary."""
    if len(tokenizer) >= SMALL_VOCABULARY:
        return []
    words = dict.fromkeys(re.findall(r"[^\W\d_]+", prompt.lower()))
    return [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]


def vocabulary_warning(tokenizer, prompt: str) -> str | None:
    """One line naming the words of `prompt` outside a small vocabulary and listing the words it knows; None when
    every word is known (or the vocabulary is CLIP's). The CLI prints it (TextEncoder.tokenize), the web page shows it."""
    unknown = unknown_words(tokenizer, prompt)
    if not unknown:
        return None
    return (f"warning: {', '.join(map(repr, unknown))} in the prompt {prompt!r} "
            f"{'is' if len(unknown) == 1 else 'are'} not in the model's vocabulary (split into letters, the edit "
            f"renders noise); the words it knows: {', '.join(known_words(tokenizer))}")


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
        check_sd_folder(path, ("text_encoder",) if tokenizer is not None else ("text_encoder", "tokenizer"))
        te = path / "text_encoder"
        tok_dir = Path(tokenizer) if tokenizer is not None else path / "tokenizer"

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
                f"{path} is a single-file checkpoint, which carries no tokenizer: put SD v1-4's tokenizer/ folder "
                f"(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) next to it, as "
                f"{path.parent / 'tokenizer'}; see weights/README.md"
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
        self._warn_truncated(prompts)
        self._warn_unknown_words(prompts)
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.long()

    def _warn_truncated(self, prompts: Sequence[str]) -> None:
        """Once per prompt, on stderr: a prompt over max_length tokens (start and end token included) is cut, as SD
        does; say how long it is and which text is kept."""
        warned = self.__dict__.setdefault("_warned", set())
        for prompt in prompts:
            if prompt in warned:
                continue
            full = self.tokenizer(prompt, truncation=False, verbose=False).input_ids
            if len(full) > self.max_length:
                warned.add(prompt)
                kept = self.tokenizer.decode(full[1:self.max_length - 1], skip_special_tokens=True)
                print(f"warning: the prompt {prompt[:60]!r}... is {len(full)} tokens, CLIP reads {self.max_length} "
                      f"(start and end included): only {kept!r} is used; shorten the prompt", file=sys.stderr)

    def _warn_unknown_words(self, prompts: Sequence[str]) -> None:
        """Once per prompt, on stderr: words a small vocabulary (the miniature model's) does not know
        (`vocabulary_warning`)."""
        warned = self.__dict__.setdefault("_warned_vocabulary", set())
        for prompt in prompts:
            if prompt not in warned:
                warned.add(prompt)
                if (line := vocabulary_warning(self.tokenizer, prompt)) is not None:
                    print(line, file=sys.stderr)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(b, 77, hidden) last_hidden_state, on the model's device and in its dtype."""
        ids = self.tokenize(prompts).to(self.model.device)
        return self.model(input_ids=ids).last_hidden_state

    def forward(self, prompts: str | Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)
