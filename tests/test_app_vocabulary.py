"""The miniature model's vocabulary check (ei2.text): a word outside its word list falls apart into letter tokens, so
it is warned about once per prompt (on stderr, from TextEncoder.tokenize: the CLI and the page alike), listing the
words the model knows; CLIP's full vocabulary is never checked."""

import json
from pathlib import Path

import pytest

from ei2.text import TextEncoder, known_words, load_tokenizer, unknown_words, vocabulary_warning

MINI = Path(__file__).resolve().parents[1] / "weights" / "mini"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINI)


def test_unknown_words_are_those_that_are_not_one_token(tokenizer):
    assert unknown_words(tokenizer, "a blue square moving right on a white background") == []
    assert unknown_words(tokenizer, "A Panda skiing on the MOON, panda!") == ["panda", "skiing", "the", "moon"]
    for word in ("panda", "moon"):  # what the check stands for: the word is spelled from several tokens
        assert len(tokenizer(word, add_special_tokens=False).input_ids) > 1
    assert len(tokenizer("square", add_special_tokens=False).input_ids) == 1


def test_known_words_are_the_word_list(tokenizer):
    vocab = json.loads((MINI / "tokenizer" / "vocab.json").read_text())
    words = known_words(tokenizer)
    assert words[:4] == ["and", "on", "background", "red"] and len(words) == 25
    assert all(f"{w}</w>" in vocab and unknown_words(tokenizer, w) == [] for w in words)


def test_warning_names_the_unknown_words_and_lists_the_known(tokenizer):
    line = vocabulary_warning(tokenizer, "a panda on the moon")
    assert line == ("warning: 'panda', 'the', 'moon' in the prompt 'a panda on the moon' are not in the model's "
                    "vocabulary (split into letters, the edit renders noise); the words it knows: "
                    + ", ".join(known_words(tokenizer)))
    assert vocabulary_warning(tokenizer, "a red star") is None
    assert "'pink' in the prompt 'a pink star' is not" in vocabulary_warning(tokenizer, "a pink star")


class ClipSized:
    """A stand-in for CLIP's tokenizer: 49408 tokens; calling it would fail."""

    def __len__(self):
        return 49408


def test_clips_vocabulary_is_not_checked():
    assert unknown_words(ClipSized(), "a panda on the moon") == []
    assert vocabulary_warning(ClipSized(), "a panda on the moon") is None


def test_encoder_warns_once_per_prompt_on_stderr(capsys):
    text = TextEncoder.from_pretrained(MINI)
    text.encode(["a panda on the moon", "a red circle moving right on a white background"])
    text.encode(["a panda on the moon", ""])
    text.encode(["a pink star"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [vocabulary_warning(text.tokenizer, "a panda on the moon"),
                   vocabulary_warning(text.tokenizer, "a pink star")]
