"""Caption cleaning and ALBEF's tokenizer convention.

``pre_caption`` reproduces ALBEF's caption cleaning. ``AlbefTokenizer`` wraps transformers' WordPiece
``BertTokenizer`` but encodes a single sentence as ``[CLS] tokens`` with **no trailing [SEP]** (ALBEF's own
tokenizer does this) and pads/truncates to exactly ``max_len`` tokens.
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from alignfuse.errors import InvalidInputError, ModelUnavailableError

logger = logging.getLogger(__name__)

_DELETE = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s+")

BUILTIN_VOCABS = {"builtin:tiny": Path(__file__).resolve().parent / "albef" / "vocab_tiny.txt"}
DEFAULT_VOCAB = "bert-base-uncased"


def pre_caption(text: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning: lowercase; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become
    spaces; ``<person>`` becomes ``person``; whitespace runs collapse to one space; strip; keep the first
    ``max_words`` words.

    Documented choices: any whitespace character (tab, newline) counts as a separator (ALBEF collapses only
    runs of two or more); a caption that is empty after cleaning raises :class:`InvalidInputError`.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"caption must be a string, got {type(text).__name__}")
    if max_words < 1:
        raise InvalidInputError("max_words must be >= 1")
    out = _DELETE.sub("", text.lower())
    out = out.replace("-", " ").replace("/", " ").replace("<person>", "person")
    out = _SPACES.sub(" ", out).strip()
    if not out:
        raise InvalidInputError(f"caption {text!r} is empty after cleaning (only punctuation/whitespace)")
    words = out.split(" ")
    if len(words) > max_words:
        out = " ".join(words[:max_words])
    return out


def _load_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = collections.OrderedDict()
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    return vocab


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def resolve_vocab_file(vocab: str | Path | None) -> Path | None:
    """A local ``vocab.txt`` for ``vocab`` (builtin name, file, or directory holding vocab.txt);
    None means "use the hub tokenizer ``bert-base-uncased``"."""
    if vocab is None or str(vocab) == DEFAULT_VOCAB:
        return None
    if str(vocab) in BUILTIN_VOCABS:
        return BUILTIN_VOCABS[str(vocab)]
    p = Path(vocab).expanduser()
    if p.is_dir():
        p = p / "vocab.txt"
    if not p.is_file():
        raise ModelUnavailableError(
            f"WordPiece vocabulary {p} does not exist (pass a vocab.txt or its directory)"
        )
    return p


class AlbefTokenizer:
    """``texts → (ids, mask)`` long tensors [n, max_len]: ``[CLS] wordpieces [PAD]...``, no [SEP].

    ``vocab``: a ``vocab.txt`` path (or directory holding one), ``builtin:tiny``, or None for
    ``bert-base-uncased`` from the Hugging Face cache (downloaded when online; fails fast offline).
    ``clean=True`` passes each text through :func:`pre_caption` first.
    """

    def __init__(self, vocab: str | Path | None = None, max_len: int = 30, *, clean: bool = True) -> None:
        from transformers import BertTokenizer

        if max_len < 2:
            raise InvalidInputError("max_len must be >= 2")
        self.max_len = max_len
        self.clean = clean
        path = resolve_vocab_file(vocab)
        if path is None:
            path = self._hub_vocab(DEFAULT_VOCAB)
        # transformers 5: BertTokenizerFast(vocab_file=...) silently ignores the file; pass the dict.
        self.tokenizer = BertTokenizer(vocab=_load_vocab(path), do_lower_case=True)
        self.source = str(path)
        self.cls_id = self._special_id("[CLS]")
        self.pad_id = self._special_id("[PAD]")
        self.sep_id = self._special_id("[SEP]")
        self.mask_id = self._special_id("[MASK]")
        self.unk_id = self._special_id("[UNK]")

    @staticmethod
    def _hub_vocab(repo: str) -> Path:
        """``vocab.txt`` of a hub tokenizer repo: from the local cache, else downloaded (fails fast offline).

        (transformers 5's ``BertTokenizer.from_pretrained`` silently returns a 5-token vocabulary when
        nothing is found, so the file is fetched and checked here instead.)"""
        from huggingface_hub import hf_hub_download

        hint = "pass a local WordPiece vocab.txt (AlbefConfig.vocab / the config JSON's 'vocab' key)"
        try:
            return Path(hf_hub_download(repo, "vocab.txt", local_files_only=True))
        except Exception as exc:
            if _hub_offline():
                raise ModelUnavailableError(
                    f"tokenizer {repo!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"
                ) from exc
        from alignfuse.models.hub import require_download

        require_download(f"tokenizer {repo}", "https://huggingface.co", hint=hint)
        try:
            return Path(hf_hub_download(repo, "vocab.txt"))
        except Exception as exc:
            raise ModelUnavailableError(
                f"tokenizer {repo!r} could not be downloaded ({exc}); {hint}"
            ) from exc

    def _special_id(self, token: str) -> int:
        idx = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(idx, int) or idx < 0:
            raise ModelUnavailableError(f"vocabulary {self.source} lacks the special token {token}")
        return idx

    @property
    def vocab_size(self) -> int:
        return int(len(self.tokenizer))

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one (cleaned, when ``clean``) text, without special tokens or truncation."""
        return list(self.tokenizer.tokenize(pre_caption(text) if self.clean else text))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise InvalidInputError("the tokenizer takes a list of strings, not one string")
        cleaned = [pre_caption(t) if self.clean else t for t in texts]
        n = len(cleaned)
        ids = torch.full((n, self.max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, self.max_len), dtype=torch.long)
        if n == 0:
            return ids, mask
        enc = self.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        for row, pieces in enumerate(enc):
            seq = [self.cls_id, *pieces[: self.max_len - 1]]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask
