"""pre_caption and ALBEF's tokenizer convention ([CLS] tokens, no [SEP], exactly max_len)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignfuse.errors import InvalidInputError, ModelUnavailableError
from alignfuse.models.albef.config import ALBEF_CONFIGS, TINY_VOCAB_SIZE
from alignfuse.models.text import BUILTIN_VOCABS, AlbefTokenizer, pre_caption


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A Dog, running!", "a dog running"),
        ('He said: "hi" (twice); ok? #tag *star* ~wave', "he said hi twice ok tag star wave"),
        ("a <person> on a skate-board/ramp", "a person on a skate board ramp"),
        ("  lots   of\tspace \n here  ", "lots of space here"),
        ("it's the dog's bone.", "its the dogs bone"),
        ("x - y", "x y"),
        ("<PERSON> waves", "person waves"),  # lower-cased before the <person> rule
        ("keep & and @ and [brackets]", "keep & and @ and [brackets]"),  # not in ALBEF's delete list
    ],
)
def test_pre_caption(raw: str, clean: str) -> None:
    assert pre_caption(raw) == clean


def test_pre_caption_truncates_to_max_words() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(text).split() == [f"w{i}" for i in range(30)]
    assert pre_caption(text, max_words=5) == "w0 w1 w2 w3 w4"


@pytest.mark.parametrize("raw", ["", "   ", "?!.,", "-- / --", "(:;)"])
def test_pre_caption_empty_after_cleaning_is_invalid_input(raw: str) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        pre_caption(raw)


def test_tiny_vocab_size_matches_file() -> None:
    lines = BUILTIN_VOCABS["builtin:tiny"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == TINY_VOCAB_SIZE == ALBEF_CONFIGS["tiny"].vocab_size
    assert len(set(lines)) == len(lines)
    assert lines[0] == "[PAD]"


def _vocab(tmp_path: Path) -> Path:
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "dog",
        "person",
        "on",
        "skate",
        "##board",
        "red",
    ]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return path


def test_tokenizer_cls_no_sep_pad_to_max_len(tmp_path: Path) -> None:
    tok = AlbefTokenizer(_vocab(tmp_path), max_len=30)
    ids, mask = tok(["A <person> on a skateboard!", "red dog"])
    assert ids.shape == mask.shape == (2, 30)
    # [CLS]=2 a=5 person=7 on=8 a=5 skate=9 ##board=10, then padding (no [SEP]=3)
    assert ids[0, :8].tolist() == [2, 5, 7, 8, 5, 9, 10, 0]
    assert mask[0].tolist() == [1] * 7 + [0] * 23
    assert ids[1, :3].tolist() == [2, 11, 6] and int(mask[1].sum()) == 3
    assert tok.sep_id not in ids.tolist()[0]
    assert tok.tokenize("skateboard") == ["skate", "##board"]


def test_tokenizer_truncates_and_unknowns(tmp_path: Path) -> None:
    _vocab(tmp_path)
    tok = AlbefTokenizer(tmp_path, max_len=6)  # a directory holding vocab.txt
    ids, mask = tok(["a dog a dog a dog a dog", "zebra"])
    assert ids[0].tolist() == [2, 5, 6, 5, 6, 5] and mask[0].tolist() == [1] * 6
    assert ids[1, :2].tolist() == [2, tok.unk_id]
    ids, mask = tok([])
    assert ids.shape == (0, 6)
    with pytest.raises(InvalidInputError):
        tok("a dog")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="empty"):
        tok(["a dog", "?!"])


def test_tokenizer_truncates_long_captions_at_30_tokens() -> None:
    tok = AlbefTokenizer("builtin:tiny")
    ids, mask = tok([" ".join(["red circle"] * 40)])
    assert int(mask.sum()) == 30 and ids.shape == (1, 30)


def test_missing_vocab_and_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        AlbefTokenizer(tmp_path / "nope.txt")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelUnavailableError, match="vocab"):
        AlbefTokenizer(None)
