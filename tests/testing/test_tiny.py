"""The tiny-model builder every test stands on (engine.testing.tiny): word-level tokenizers with the special ids
the engine assumes, and seeded models that a saved directory gives back weight for weight."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.testing.tiny import build_model, build_tokenizer, save_tiny

TEXTS = ["the fox eats berries", "the owl eats mice"]
WORDS = sorted({word for text in TEXTS for word in text.split()})


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_tokenizer_has_one_id_per_word_after_the_four_specials(add_bos):
    tokenizer = build_tokenizer(TEXTS, add_bos=add_bos, extra_special=("<|im_start|>",))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert [tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token] == specials
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 4
    assert len(tokenizer) == 5 + len(WORDS)
    ids = tokenizer("the fox eats honey")["input_ids"]
    if add_bos:  # <bos> first only where asked
        assert ids[0] == 2
        ids = ids[1:]
    assert 2 not in ids
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words == ["the", "fox", "eats", "<unk>"]  # one id per known word, <unk> for the rest


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_seed_fixes_the_weights_and_a_saved_directory_gives_them_back(tmp_path, kind):
    first = build_model(kind, vocab_size=20, hidden=8, layers=2, heads=2, seed=5).state_dict()
    again = build_model(kind, vocab_size=20, hidden=8, layers=2, heads=2, seed=5).state_dict()
    other = build_model(kind, vocab_size=20, hidden=8, layers=2, heads=2, seed=6).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)

    path = save_tiny(tmp_path / kind, kind, TEXTS, hidden=8, layers=2, heads=2, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(path)
    saved = AutoModelForCausalLM.from_pretrained(path)
    built = build_model(kind, vocab_size=len(tokenizer), hidden=8, layers=2, heads=2, seed=5)
    assert saved.config.vocab_size == len(tokenizer) == 4 + len(WORDS)
    loaded, expected = saved.state_dict(), built.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_an_unknown_kind_is_refused_naming_the_kinds():
    with pytest.raises(ValueError, match="unknown tiny model kind 'bert'; use 'gpt2' or 'llama'"):
        build_model("bert", vocab_size=10)
