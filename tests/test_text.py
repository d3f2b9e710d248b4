"""Text encoder: tokenization as SD v1 does it, encoding, folder and single-file loading, errors.

The real SD v1-4 encoder gives (b, 77, 768); these tests use a tiny random model (hidden 32) in the same layout.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from ei2.errors import Ei2Error
from ei2.mini.tokenizer import write_tiny_text_model
from ei2.text import MAX_LENGTH, TextEncoder, load_tokenizer
from ei2.weights import TEXT_PREFIX, compvis_text_key_map, save_safetensors

WORDS = ["a", "on", "the", "red", "green", "blue", "yellow", "square", "circle", "triangle", "moving", "background"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_text_model(tmp_path_factory.mktemp("sd") / "tiny-sd", WORDS, seed=0)


@pytest.fixture(scope="module")
def encoder(sd_folder) -> TextEncoder:
    return TextEncoder.from_pretrained(sd_folder)


def _id(encoder, token):
    return encoder.tokenizer.convert_tokens_to_ids(token)


def test_layout_is_sd_v1_4(sd_folder):
    for f in ["text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]:
        assert (sd_folder / f).is_file(), f


def test_weights_use_published_names_and_load_exactly(sd_folder, encoder):
    """The file names tensors as SD v1-4's text_encoder/model.safetensors does, and every one of them is loaded
    (transformers would initialise absent ones at random with only a warning)."""
    from safetensors.torch import load_file

    saved = load_file(str(sd_folder / "text_encoder" / "model.safetensors"))
    assert set(saved) == set(compvis_text_key_map(2))
    own = encoder.model.state_dict()
    for k, v in saved.items():
        mine = own[k] if k in own else own[k.removeprefix("text_model.")]
        assert torch.equal(mine, v), k


def test_special_tokens_like_sd(encoder):
    tok = encoder.tokenizer
    bos, eos = _id(encoder, "<|startoftext|>"), _id(encoder, "<|endoftext|>")
    assert tok.bos_token_id == bos and tok.eos_token_id == eos
    assert tok.pad_token_id == eos  # SD v1-4 pads with <|endoftext|> (49407 there)
    assert (bos, eos) == (len(tok) - 2, len(tok) - 1)  # last two ids, as CLIP's 49406 / 49407


def test_every_vocabulary_word_is_one_token(encoder):
    for w in WORDS:
        assert encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(w, add_special_tokens=False).input_ids) \
            == [w + "</w>"]


def test_padding_token_by_token(encoder):
    bos, eos = _id(encoder, "<|startoftext|>"), _id(encoder, "<|endoftext|>")
    ids = encoder.tokenize(["a red square on a blue background", "", "Red   SQUARE"])
    assert ids.dtype == torch.long and ids.shape == (3, MAX_LENGTH) == (3, 77)
    words = [_id(encoder, w + "</w>") for w in "a red square on a blue background".split()]
    assert ids[0].tolist() == [bos] + words + [eos] * (77 - 1 - len(words))
    assert ids[1].tolist() == [bos] + [eos] * 76  # "" is valid: the unconditional context
    # lower-cased, whitespace collapsed
    assert ids[2].tolist() == [bos, _id(encoder, "red</w>"), _id(encoder, "square</w>")] + [eos] * 74


def test_unknown_words_fall_back_to_letters(encoder):
    ids = encoder.tokenize("zebra")[0].tolist()
    toks = encoder.tokenizer.convert_ids_to_tokens(ids[1:6])
    assert toks == ["z", "e", "b", "r", "a</w>"]


def test_long_prompt_truncated_to_77_ending_with_eos(encoder):
    bos, eos = _id(encoder, "<|startoftext|>"), _id(encoder, "<|endoftext|>")
    ids = encoder.tokenize(" ".join(["red", "square"] * 60))[0].tolist()
    red, square = _id(encoder, "red</w>"), _id(encoder, "square</w>")
    assert len(ids) == 77 and ids[0] == bos and ids[-1] == eos
    assert ids[1:76] == ([red, square] * 38)[:75]


def test_encode_shape_and_equals_transformers(encoder, sd_folder):
    from transformers import CLIPTextModel

    prompts = ["a red square on a blue background", "", "a green circle moving"]
    out = encoder.encode(prompts)
    assert out.shape == (3, 77, encoder.hidden_size) == (3, 77, 32)
    assert not out.requires_grad
    ref_model = CLIPTextModel.from_pretrained(str(sd_folder / "text_encoder"), local_files_only=True).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=encoder.tokenize(prompts)).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out[0], out[1])  # different prompts, different contexts


def test_dtype_argument(sd_folder):
    enc = TextEncoder.from_pretrained(sd_folder, dtype=torch.bfloat16)
    assert enc.encode([""]).dtype == torch.bfloat16


def test_tiny_model_is_deterministic(tmp_path, sd_folder):
    again = write_tiny_text_model(tmp_path / "again", WORDS, seed=0)
    for f in ["text_encoder/model.safetensors", "text_encoder/config.json", "tokenizer/vocab.json",
              "tokenizer/merges.txt"]:
        assert _sha(again / f) == _sha(sd_folder / f), f
    other = write_tiny_text_model(tmp_path / "other", WORDS, seed=1)
    assert _sha(other / "text_encoder/model.safetensors") != _sha(sd_folder / "text_encoder/model.safetensors")


def _sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_missing_tokenizer_folder_is_named(tmp_path, sd_folder):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(Ei2Error) as e:
        TextEncoder.from_pretrained(broken)
    msg = str(e.value)
    assert f"{broken}: missing tokenizer/vocab.json" in msg and "merges.txt" in msg and "weights/README.md" in msg
    assert "\n" not in msg


def test_missing_text_encoder_weights_are_named(tmp_path, sd_folder):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(Ei2Error, match="text_encoder/model.safetensors"):
        TextEncoder.from_pretrained(broken)
    with pytest.raises(Ei2Error, match="model not found"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")


def _compvis_file(sd_folder: Path, path: Path) -> Path:
    """A single-file checkpoint holding the tiny text model under CompVis names (plus an unrelated tensor)."""
    from safetensors.torch import load_file

    te = load_file(str(sd_folder / "text_encoder" / "model.safetensors"))
    tensors = {TEXT_PREFIX + k: v for k, v in te.items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    tensors[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, str(path))
    else:
        save_safetensors(tensors, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint(tmp_path, sd_folder, encoder, suffix):
    ckpt = _compvis_file(sd_folder, tmp_path / f"tiny{suffix}")
    config = encoder.model.config  # a single file implies CLIP ViT-L/14; the tiny test model needs its own config
    enc = TextEncoder.from_pretrained(ckpt, config=config, tokenizer=sd_folder / "tokenizer")
    prompts = ["a red square", ""]
    torch.testing.assert_close(enc.encode(prompts), encoder.encode(prompts), rtol=0, atol=0)
    # an SD folder works as the tokenizer argument too
    enc2 = TextEncoder.from_pretrained(ckpt, config=config, tokenizer=sd_folder)
    assert torch.equal(enc2.tokenize(prompts), encoder.tokenize(prompts))


def test_single_file_needs_a_tokenizer(tmp_path, sd_folder):
    ckpt = _compvis_file(sd_folder, tmp_path / "tiny.safetensors")
    with pytest.raises(Ei2Error, match="carries no tokenizer") as e:
        TextEncoder.from_pretrained(ckpt)
    assert "tokenizer/" in str(e.value)


def test_single_file_with_default_vit_l_config_reports_missing_layers(tmp_path, sd_folder):
    """The tiny file has 2 layers; the default (SD v1) config expects 12: the error names the file and the keys."""
    ckpt = _compvis_file(sd_folder, tmp_path / "tiny.safetensors")
    with pytest.raises(Ei2Error) as e:
        TextEncoder.from_pretrained(ckpt, tokenizer=sd_folder)
    msg = str(e.value)
    assert str(ckpt) in msg and "encoder.layers.2." in msg


def test_load_tokenizer_names_missing_files(tmp_path, sd_folder):
    tok = tmp_path / "tok"
    shutil.copytree(sd_folder / "tokenizer", tok)
    (tok / "merges.txt").unlink()
    with pytest.raises(Ei2Error, match="merges.txt"):
        load_tokenizer(tok)


def test_incomplete_weight_file_is_refused(tmp_path, sd_folder):
    """transformers would fill a missing tensor with random values and only warn; ei2 refuses."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    f = broken / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(Ei2Error, match="layers.1.mlp.fc2.bias"):
        TextEncoder.from_pretrained(broken)
