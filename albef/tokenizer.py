"""ALBEF's text processing: caption cleaning and the bert-base-uncased WordPiece tokenizer without [SEP].

The official tokenizer (``models/tokenization_bert.py``) emits ``[CLS] + word-pieces`` for a single sequence,
with no trailing ``[SEP]``; official checkpoints were trained that way, so a stock BERT tokenizer (which appends
[SEP]) degrades them. VQA answers carry an explicit ``[SEP]`` as end-of-sequence; it is parsed as the special
token here.

Built on HuggingFace ``tokenizers`` (Rust): BERT normalisation (lower-casing, accent stripping), BERT
pre-tokenisation and WordPiece over the shipped vocabulary (``albef/assets``), so nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

VOCAB_FILE = Path(__file__).parent / "assets" / "bert-base-uncased-vocab.txt"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Official ``pre_caption``: lower-case, drop ``,.'!?"()*#:;~``, ``-``/``/`` -> space, ``<person>`` -> person,
    collapse whitespace, keep the first ``max_words`` words."""
    caption = _PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Official ``pre_question``: like ``pre_caption`` without collapsing whitespace; no trailing space."""
    question = _PUNCT.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


class Tokenizer:
    """bert-base-uncased WordPiece with ALBEF's conventions.

    ``tok(texts, max_length=25)`` returns ``{'input_ids', 'attention_mask'}`` (int64), padded to the longest
    sequence (``padding='longest'``) or to ``max_length`` (``padding='max_length'``), truncated to ``max_length``
    ids including [CLS].
    """

    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 100, 101, 102, 103

    def __init__(self, vocab_file: Union[str, Path] = VOCAB_FILE):
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise FileNotFoundError(f"vocabulary file {vocab_file} does not exist")
        vocab = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip("\n")] = i
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{vocab_file}: special tokens {missing} are not in the vocabulary")
        tok = _Tok(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", special_tokens=[("[CLS]", vocab["[CLS]"])]
        )
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens(SPECIAL_TOKENS)
        self._tok = tok
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.pad_token_id = vocab["[PAD]"]
        self.unk_token_id = vocab["[UNK]"]
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.mask_token_id = vocab["[MASK]"]

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None) -> "Tokenizer":
        """``None`` or ``bert-base-uncased``: the shipped vocabulary. A ``vocab.txt`` file or a directory holding
        one: that vocabulary. Anything else is taken as a HuggingFace hub id whose ``vocab.txt`` is fetched."""
        if name_or_path in (None, "bert-base-uncased"):
            return cls(VOCAB_FILE)
        p = Path(name_or_path)
        if p.is_file():
            return cls(p)
        if p.is_dir():
            if not (p / "vocab.txt").is_file():
                raise FileNotFoundError(f"{p} has no vocab.txt")
            return cls(p / "vocab.txt")
        from huggingface_hub import hf_hub_download

        return cls(hf_hub_download(str(name_or_path), "vocab.txt"))

    def tokenize(self, text: str) -> List[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        max_length: Optional[int] = 25,
        padding: str = "longest",
        truncation: bool = True,
    ) -> dict:
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding={padding!r}: expected 'longest' or 'max_length'")
        encs = self._tok.encode_batch(list(texts))
        ids = [e.ids for e in encs]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        width = max(len(x) for x in ids) if ids else 0
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            width = max(width, max_length)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
