"""Growing models for an extended vocabulary: rows in place, old rows bit-identical, stock save/reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from hf_cpt.config import CPTConfig
from hf_cpt.testing import (
    make_tiny_llama,
    make_tiny_tokenizer,
    read_embedded,
    train_unigram_tokenizer,
    train_wordpiece_tokenizer,
)
from hf_cpt.callbacks.new_rows_first import NewRowsFirstCallback
from hf_cpt.vocab.extend import VocabConfig, extend_model, extend_vocabulary
from hf_cpt.vocab.init import init_subword_mean
from hf_cpt.vocab.tokens import learn_domain_tokens
from hf_cpt.vocab.vectors import WordVectors, build_word_vectors

from ..conftest import tiny_run_dict


@pytest.fixture(scope="module")
def texts():
    return read_embedded("python-docs", limit=30), read_embedded("kjv", limit=30)


@pytest.fixture(scope="module")
def bpe(texts):
    base = make_tiny_tokenizer()
    return base, learn_domain_tokens(texts[0], base, 64)


@pytest.fixture(scope="module")
def vectors(texts):
    return build_word_vectors(texts[0] + texts[1], dim=16)


@pytest.mark.parametrize("init", ["ofa", "subword_mean", "mean", "random"])
def test_tied_decoder_save_and_reload(init, bpe, vectors, tmp_path):
    base, ext = bpe
    model = make_tiny_llama(len(base))
    old = model.get_input_embeddings().weight.detach().clone()
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, init, old_tokenizer=base, word_vectors=vectors)
    w = model.get_input_embeddings().weight
    assert w.shape[0] == len(ext.tokenizer) and model.config.vocab_size == len(ext.tokenizer)
    assert torch.equal(w[: len(base)], old)  # bit-identical
    assert stats["tied"] and model.lm_head.weight.data_ptr() == w.data_ptr()
    assert torch.isfinite(w).all() and not torch.equal(w[len(base):], torch.zeros_like(w[len(base):]))
    if init == "ofa":
        assert 0 < stats["ofa_coverage"] <= 1
    model.save_pretrained(tmp_path)
    ext.tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert torch.equal(again.get_input_embeddings().weight, w.detach())
    assert again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    text = read_embedded("python-docs", "validation", limit=1)[0][:500]
    assert tok(text)["input_ids"] == ext.tokenizer(text)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([tok(text)["input_ids"][:64]])
        assert torch.isfinite(again(ids, labels=ids).loss)


def test_subword_mean_rows_are_where_the_tokens_are(bpe):
    base, ext = bpe
    model = make_tiny_llama(len(base))
    old = model.get_input_embeddings().weight.detach().clone()
    extend_model(model, ext.tokenizer, ext.new_tokens, "subword_mean", old_tokenizer=base)
    w = model.get_input_embeddings().weight.detach()
    for tok, i in list(zip(ext.new_tokens, ext.new_token_ids))[:10]:
        pieces = base(ext.tokenizer.convert_tokens_to_string([tok]), add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(w[i], init_subword_mean(old, [pieces])[0])


def test_padded_vocabulary_puts_rows_at_token_ids(bpe):
    """A model padded beyond len(tokenizer) (e.g. to a multiple of 64): new token i gets row i, inside the
    padding first; the grown matrix keeps the padding granularity."""
    base, ext = bpe
    padded = ((len(base) + 20) // 64 + 1) * 64  # room for some, not all, of the new rows
    model = make_tiny_llama(padded)
    old = model.get_input_embeddings().weight.detach().clone()
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, "subword_mean", old_tokenizer=base)
    w = model.get_input_embeddings().weight.detach()
    assert stats["rows_before"] == padded and w.shape[0] % 64 == 0 and w.shape[0] >= len(ext.tokenizer)
    assert torch.equal(w[: len(base)], old[: len(base)])
    pieces = base(ext.tokenizer.convert_tokens_to_string([ext.new_tokens[0]]), add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(w[len(base)], init_subword_mean(old[: len(base)], [pieces])[0])
    # the model predicts over the real tokens: new token ids index real rows
    with torch.no_grad():
        ids = torch.tensor([[ext.new_token_ids[-1], 5, ext.new_token_ids[0]]])
        assert model(ids).logits.shape[-1] == w.shape[0]


def test_untied_head_grows_and_initialises_both(bpe, vectors):
    from transformers import LlamaForCausalLM

    base, ext = bpe
    cfg = make_tiny_llama(len(base)).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.lm_head.weight.detach().clone()
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, "ofa", old_tokenizer=base, word_vectors=vectors)
    assert not stats["tied"]
    n = len(base)
    assert torch.equal(model.get_input_embeddings().weight[:n], old_in)
    assert torch.equal(model.lm_head.weight[:n], old_out)
    assert model.lm_head.weight.shape[0] == len(ext.tokenizer)
    assert not torch.equal(model.lm_head.weight[n:], model.get_input_embeddings().weight[n:])


@pytest.mark.slow  # extends and trains three encoder families
@pytest.mark.parametrize("kind", ["bert-wordpiece", "xlmr-unigram"])
def test_encoders(kind, texts, vectors, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    if kind == "bert-wordpiece":
        base = train_wordpiece_tokenizer(texts[1], 500)
        model = BertForMaskedLM(BertConfig(vocab_size=len(base), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64))
    else:
        base = train_unigram_tokenizer(texts[1], 600)
        model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(base), hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64,
                                                       pad_token_id=base.pad_token_id))
    ext = learn_domain_tokens(texts[0], base, 50)
    old = model.get_input_embeddings().weight.detach().clone()
    extend_model(model, ext.tokenizer, ext.new_tokens, "ofa", old_tokenizer=base, word_vectors=vectors)
    assert torch.equal(model.get_input_embeddings().weight[: len(base)], old)
    model.save_pretrained(tmp_path)
    ext.tokenizer.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    enc = tok("the subprocess module", return_tensors="pt")
    assert again(**enc).logits.shape[-1] == len(ext.tokenizer)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight.detach())


def test_extend_model_errors(bpe, vectors):
    base, ext = bpe
    model = make_tiny_llama(len(base))
    with pytest.raises(ValueError, match="needs `old_tokenizer`"):
        extend_model(model, ext.tokenizer, ext.new_tokens, "subword_mean")
    with pytest.raises(ValueError, match="needs `word_vectors`"):
        extend_model(model, ext.tokenizer, ext.new_tokens, "ofa", old_tokenizer=base)
    with pytest.raises(ValueError, match="`init` must be one of"):
        extend_model(model, ext.tokenizer, ext.new_tokens, "zeros")
    with pytest.raises(ValueError, match="not in the extended tokenizer"):
        extend_model(model, ext.tokenizer, ["Ġnot_a_token_at_all"], "random")


def test_word_vectors_round_trip_and_dictionary(tmp_path, vectors):
    from hf_cpt.vocab.vectors import read_pairs, vectors_from_dictionary

    path = tmp_path / "vecs.txt"
    vectors.save(path)
    loaded = WordVectors.load(path)
    assert loaded.words == vectors.words
    assert abs(loaded.matrix - vectors.matrix).max() < 1e-3
    (tmp_path / "dict.tsv").write_text("# eng\tdeu\nGod\tGott\nlight\tLicht\nearth\tErde\nearth\tLand\n")
    pairs = read_pairs(tmp_path / "dict.tsv")
    both = vectors_from_dictionary(vectors, pairs)
    i = {w: k for k, w in enumerate(both.words)}
    assert (both.matrix[i["Gott"]] == vectors.matrix[vectors.words.index("God")]).all()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no vectors"):
        WordVectors.load(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="`word_vectors`"):
        WordVectors.load(tmp_path / "missing.txt")


def test_new_rows_first_callback_trains_only_new_rows(bpe, tmp_path):
    from transformers import Trainer, TrainingArguments

    base, ext = bpe
    model = make_tiny_llama(len(base))
    extend_model(model, ext.tokenizer, ext.new_tokens, "subword_mean", old_tokenizer=base)
    n = len(base)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = ext.tokenizer(read_embedded("python-docs", limit=4)[0], add_special_tokens=False)["input_ids"][:32 * 8]
    data = [{"input_ids": ids[i:i + 32], "labels": ids[i:i + 32]} for i in range(0, len(ids), 32)]
    assert any(i >= n for i in ids)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    cb = NewRowsFirstCallback(n, steps=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    after = model.state_dict()
    w_key = "model.embed_tokens.weight"
    assert torch.equal(after[w_key][:n], before[w_key][:n])
    assert not torch.equal(after[w_key][n:], before[w_key][n:])
    body = [k for k in after if k != w_key and k != "lm_head.weight"]
    assert all(torch.equal(after[k], before[k]) for k in body)
    assert all(p.requires_grad for p in model.parameters())  # restored after the phase


@pytest.mark.slow  # a training run with a vocabulary extension
def test_run_cpt_with_vocab_block(tiny_model_dir, tmp_path):
    from hf_cpt.recipe.train import run_cpt

    d = tiny_run_dict(tiny_model_dir, max_steps=3)
    d["vocab"] = {"n_new_tokens": 40, "init": "ofa", "vector_dim": 16, "new_rows_first_steps": 1}
    cfg = CPTConfig.from_dict(d)
    res = run_cpt(cfg, output_dir=tmp_path / "out")
    out = res.output_dir
    summary = json.loads((out / "hf_cpt_vocab.json").read_text())
    assert summary["added"] == 40 and summary["fertility_after"] < summary["fertility_before"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == summary["new_vocab_size"]
    assert "vocabulary extension: 40 domain subwords" in (out / "README.md").read_text()


def test_vocab_config_validation():
    with pytest.raises(ValueError, match="`vocab.init` must be one of"):
        CPTConfig.from_dict({"vocab": {"init": "zeros"}})
    with pytest.raises(ValueError, match="`vocab.n_new_tokens`"):
        CPTConfig.from_dict({"vocab": {"n_new_tokens": 0}})
    assert VocabConfig().top_k == 10 and VocabConfig().temperature == 0.1


def test_extend_vocabulary_empty_corpus(bpe):
    base, _ = bpe
    with pytest.raises(ValueError, match="corpus is empty"):
        extend_vocabulary(make_tiny_llama(len(base)), base, VocabConfig(n_new_tokens=5), [""])


def test_read_freedict_dictd_format(tmp_path):
    import gzip

    from hf_cpt.vocab.vectors import _DICTD_B64, read_freedict

    def b64(n):
        out = ""
        while True:
            out = _DICTD_B64[n % 64] + out
            n //= 64
            if not n:
                return out

    entries = [("house", "house /haus/\nHaus <neut>, Gebäude <neut> [arch.]\n"),
               ("computer", "computer /kəm/\nComputer <masc>, Rechner <masc> [comp.]\n  \"x\" - y\n"),
               ("open house", "open house\nTag der offenen Tür\n")]
    data, index, pos = b"", [], 0
    for word, body in entries:
        raw = body.encode()
        index.append(f"{word}\t{b64(pos)}\t{b64(len(raw))}")
        data += raw
        pos += len(raw)
    (tmp_path / "eng-deu.index").write_text("\n".join(index) + "\n")
    (tmp_path / "eng-deu.dict.dz").write_bytes(gzip.compress(data))
    pairs = read_freedict(tmp_path / "eng-deu.index")
    assert pairs == [("house", "Haus"), ("house", "Gebäude"), ("computer", "Computer"), ("computer", "Rechner")]
    with pytest.raises(FileNotFoundError, match="`dictionary`"):
        read_freedict(tmp_path / "missing.index")
