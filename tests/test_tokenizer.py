import pytest
import torch

from albef.tokenizer import Tokenizer, pre_caption, pre_question


def test_matches_official_tokenization(parity_pretrain):
    ref = parity_pretrain
    tok = Tokenizer()
    captions = [pre_caption(c) for c in ref["raw_captions"]]
    assert captions == ref["captions"]
    out = tok(captions, max_length=25)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert [tok.convert_ids_to_tokens(r) for r in out["input_ids"]] == ref["tokens"]


def test_conventions():
    tok = Tokenizer()
    out = tok(["a dog", "a very very long caption " * 10], max_length=8)
    assert out["input_ids"].shape == (2, 8)
    assert out["input_ids"][0].tolist() == [101, 1037, 3899, 0, 0, 0, 0, 0]  # [CLS] a dog, no [SEP]
    assert 102 not in out["input_ids"]
    assert tok(["a dog"], max_length=30, padding="max_length")["input_ids"].shape == (1, 30)
    assert tok("yes[SEP]")["input_ids"].tolist() == [[101, 2748, 102]]  # VQA answers end in an explicit [SEP]
    assert tok.vocab_size == 30522 and tok.mask_token_id == 103


def test_pre_caption_and_question():
    assert pre_caption("A  <person> rides a bike-path/road, (fast)!!") == "a person rides a bike path road fast"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_question("What colour is the cat's hat?") == "what colour is the cats hat"


def test_missing_vocab_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer(tmp_path / "nope.txt")
