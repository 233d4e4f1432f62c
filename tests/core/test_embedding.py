"""The embedding table and the list tokens derived from a model's own tokenizer.json: the frame
and separator `tokens` gists read as, and which tokens begin a word, for byte-level BPE ("Ġ") and
SentencePiece-style ("▁") tokenizers alike; what cannot work is refused with a warning."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lens_serve.core.embedding import (
    EMBEDDING_KEY,
    FRAME_CLOSE_TEXT,
    FRAME_OPEN_TEXT,
    SEPARATOR_TEXT,
    EmbeddingTable,
    ListTokens,
    read_list_tokens,
)
from lens_serve.core.gistnet import gist_config

CORPUS = [
    "the quick brown fox jumps over the lazy dog, then [naps] ... and dreams.\n\n",
    "def main(argv):\n    return [x, y] if argv else None\n",
    "alpha beta gamma, delta epsilon ... zeta eta theta]\n\n",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPACE = {"byte-level": "Ġ", "metaspace": "▁", "llama2": "▁"}  # how each style spells a space


def _byte_level() -> Tokenizer:
    """GPT-2 style, as the `tiny` and SmolLM2 tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _metaspace() -> Tokenizer:
    """Metaspace pre-tokenizer and decoder that put a space before a text, as `tiny-qwen`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _llama2() -> Tokenizer:
    """Llama 2's layout: the space before a text comes from a normalizer, no pre-tokenizer, byte
    fallback, and a decoder chain that strips the text's first space."""
    trained = _metaspace()
    spec = json.loads(trained.to_str())["model"]
    learned = sorted(spec["vocab"], key=spec["vocab"].__getitem__)[len(SPECIALS) :]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *BYTE_TOKENS, *learned])}
    merges = [(a, b) for a, b in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


STYLES: dict[str, Callable[[], Tokenizer]] = {
    "byte-level": _byte_level,
    "metaspace": _metaspace,
    "llama2": _llama2,
}


def _spelling(tok: Tokenizer, token_id: int) -> str:
    spelling = tok.id_to_token(token_id)
    assert spelling is not None, token_id
    return spelling


def _model_dir(tmp_path: Path, tok: Tokenizer) -> Path:
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("style", STYLES)
def test_list_tokens_read_as_the_frame_and_the_separator_in_every_style(
    style: str, tmp_path: Path
) -> None:
    tok = STYLES[style]()
    marks = read_list_tokens(_model_dir(tmp_path, tok), tok.get_vocab_size())
    assert marks is not None
    assert tok.decode([marks.separator]) == SEPARATOR_TEXT
    listed = [*marks.opener, marks.separator, *marks.closer]
    assert tok.decode(listed) == FRAME_OPEN_TEXT + SEPARATOR_TEXT + FRAME_CLOSE_TEXT


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_the_frame_has_no_space_the_tokenizer_puts_before_a_text(
    style: str, tmp_path: Path
) -> None:
    tok = STYLES[style]()
    # Encoded alone, "[" and "," get SentencePiece's leading space; inside a text they have none.
    assert tok.encode(FRAME_OPEN_TEXT).tokens[0].startswith("▁")
    marks = read_list_tokens(_model_dir(tmp_path, tok), tok.get_vocab_size())
    assert marks is not None
    assert [tok.id_to_token(i) for i in (marks.separator, *marks.opener)] == [",", "["]
    assert _spelling(tok, marks.closer[0]).startswith("▁")  # " ...": its own space stays


@pytest.mark.parametrize("style", STYLES)
def test_word_starts_are_the_tokens_spelled_with_a_leading_space(
    style: str, tmp_path: Path
) -> None:
    tok = STYLES[style]()
    size = tok.get_vocab_size()
    marks = read_list_tokens(_model_dir(tmp_path, tok), size + 3)  # rows the tokenizer never uses
    assert marks is not None and marks.word_starts.shape == (size + 3,)
    spelled = [
        _spelling(tok, i).startswith(SPACE[style]) or _spelling(tok, i) == "<0x20>"  # a space
        for i in range(size)
    ]
    assert marks.word_starts.tolist() == [*spelled, False, False, False]
    assert 0 < sum(spelled) < size


def _byte_level_list_tokens(tokenizer_json: Path, vocab_size: int) -> ListTokens:
    """The rule lens-serve had before the list tokens were derived: the byte-level BPE spellings
    looked up in the vocabulary."""
    vocab: dict[str, int] = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    word_starts = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
    word_starts[[i for t, i in vocab.items() if t.startswith("Ġ") and i < vocab_size]] = True
    return ListTokens(
        vocab[","], (vocab["["],), (vocab["Ġ..."], vocab["]"], vocab["ĊĊ"]), word_starts
    )


@pytest.mark.parametrize(
    "fixture", ["tiny_model_dir", pytest.param("smollm2_model_dir", marks=pytest.mark.slow)]
)
def test_list_tokens_of_the_byte_level_models_are_what_they_were(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    table = EmbeddingTable.from_checkpoint(model_dir)
    got = table.list_tokens
    want = _byte_level_list_tokens(model_dir / "tokenizer.json", table.vocab_size)
    assert got is not None
    assert (got.separator, got.opener, got.closer) == (want.separator, want.opener, want.closer)
    assert torch.equal(got.word_starts, want.word_starts)
    if fixture == "smollm2_model_dir":  # a real model's ids are fixed
        assert (got.separator, got.opener, got.closer) == (28, (75,), (4563, 77, 1116))


def test_tiny_qwen_gists_read_as_a_framed_list(tiny_qwen_model_dir: Path) -> None:
    table = EmbeddingTable.from_checkpoint(tiny_qwen_model_dir)
    marks = table.list_tokens
    assert marks is not None
    tok = Tokenizer.from_file(str(tiny_qwen_model_dir / "tokenizer.json"))
    assert [tok.id_to_token(i) for i in (marks.separator, *marks.opener)] == [",", "["]
    assert tok.decode([marks.separator, *marks.closer]) == SEPARATOR_TEXT + FRAME_CLOSE_TEXT
    config = gist_config(table)
    assert config.whole_words and config.frame_rows == 1 + len(marks.closer) > 1


# --------------------------------------------------------------------------- refusals


def test_a_model_without_tokenizer_json_gets_bare_gists_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert read_list_tokens(tmp_path, 100) is None
    assert str(tmp_path) in caplog.text and "no tokenizer.json" in caplog.text


def _word_level(words: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.mark.parametrize(
    ("words", "reason"),
    [
        (["<unk>", "a", "b"], "no single token for ','"),
        (["<unk>", ",", "a"], "cannot encode the frame '['"),
    ],
)
def test_a_tokenizer_that_cannot_show_the_list_gets_bare_gists_with_a_warning(
    words: list[str], reason: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert read_list_tokens(_model_dir(tmp_path, _word_level(words)), len(words)) is None
    assert str(tmp_path) in caplog.text and reason in caplog.text


def test_frame_ids_beyond_the_embedding_table_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tok = _byte_level()
    closer = tok.encode(FRAME_CLOSE_TEXT).ids
    with caplog.at_level(logging.WARNING):
        assert read_list_tokens(_model_dir(tmp_path, tok), max(closer)) is None
    assert "embedding rows" in caplog.text


def test_an_unreadable_tokenizer_json_gets_bare_gists_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with caplog.at_level(logging.WARNING):
        assert read_list_tokens(tmp_path, 100) is None
    assert "cannot read tokenizer.json" in caplog.text


def test_a_checkpoint_without_the_embedding_table_names_the_tensors_it_has(
    tmp_path: Path,
) -> None:
    save_file({"transformer.wte.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=rf"no tensor '{EMBEDDING_KEY}'.*transformer\.wte\.weight"):
        EmbeddingTable.from_checkpoint(tmp_path)


def test_a_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        EmbeddingTable.from_checkpoint(tmp_path)
