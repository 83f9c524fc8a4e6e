"""Character tokenizer and mttl collation: labels on exactly the target, left truncation."""

from __future__ import annotations

import pytest

from lorafuse.data.collate import IGNORE, Collator, collate, encode
from lorafuse.data.tokenizer import build_char_tokenizer, save_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_one_token_per_character_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    text = "Count the a's [in brackets]:\nInput: abca => 2."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    save_char_tokenizer(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_labels_cover_exactly_the_target_and_eos(tok):
    pairs = [("Add the numbers: 1, 2, 3", "6"), ("Say if it is an animal: a big red cat", "[yes]")]
    batch = Collator(tok)(pairs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i, (src, tgt) in enumerate(pairs):
        n = len(src) + 1 + len(tgt) + 1  # source, space, target, eos: one token per char
        assert int(mask[i].sum()) == n and mask[i, :n].all()
        labelled = labels[i] != IGNORE
        assert int(labelled.sum()) == len(tgt) + 2  # the space moves to the target (mttl)
        assert not labelled[: len(src)].any() and labelled[len(src) : n].all()
        assert tok.decode(labels[i, labelled][:-1]) == " " + tgt
        assert int(labels[i, labelled][-1]) == tok.eos_token_id
        assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == IGNORE).all()


def test_long_sources_are_cut_from_the_left(tok):
    src, tgt = "x" * 20 + "KEEP THE END", "ok"
    batch = collate(encode(tok, [(src, tgt)]), tok.pad_token_id, max_length=16)
    row = batch["input_ids"][0]
    keep = 16 - (len(tgt) + 2)
    assert row.shape[0] == 16
    assert tok.decode(row[:keep]) == src[-keep:]
    assert tok.decode(row[keep:-1]) == " " + tgt
    assert int((batch["labels"][0] != IGNORE).sum()) == len(tgt) + 2


def test_truncate_keeps_a_source_that_fits_whole_and_cuts_from_the_left():
    from lorafuse.data.collate import truncate

    source, target = list(range(60)), [100, 101]
    assert truncate(source, target, 128) == (source, target)  # 62 tokens fit: nothing cut
    assert truncate(source, target, 40) == (source[-38:], target)  # cut from the left
    assert truncate(source, list(range(50)), 30) == ([], list(range(30)))  # target alone
