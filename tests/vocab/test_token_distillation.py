"""Token Distillation: contexts, the hidden-state loss it lowers, determinism, old rows untouched."""

from __future__ import annotations

import pytest
import torch

from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer, read_embedded
from hf_cpt.vocab.token_distillation import distill_mismatch, init_distill, mine_distill_contexts, resolve_precision
from hf_cpt.vocab.extend import VocabConfig, extend_model, extend_vocabulary
from hf_cpt.vocab.init import init_subword_mean
from hf_cpt.vocab.tokens import learn_domain_tokens


@pytest.fixture(scope="module")
def setup():
    dom = read_embedded("python-docs", limit=20)
    base = make_tiny_tokenizer()
    ext = learn_domain_tokens(dom, base, 48)
    return dom, base, ext


def naive_mismatch(model, old, rows, ctx):
    """Direct transcription: full forward passes with every hidden state, block 1's output, per snippet."""
    n_old = old.shape[0]
    table = torch.cat([old, rows])
    errs = []
    with torch.no_grad():
        for c in ctx:
            hs_t = model.base_model(inputs_embeds=old[torch.tensor([c.old_ids])], output_hidden_states=True)
            hs_s = model.base_model(inputs_embeds=table[torch.tensor([c.new_ids])], output_hidden_states=True)
            t = hs_t.hidden_states[1][0, c.old_pos]
            s = hs_s.hidden_states[1][0, c.new_pos]
            errs.append(((t - s) ** 2).mean())
    assert n_old == len(old)
    return errs


def test_contexts_align_the_same_text(setup):
    dom, base, ext = setup
    ctx = mine_distill_contexts(dom, base, ext.tokenizer, len(base), per_token=2, length=24)
    assert ctx and all(any(i >= len(base) for i in c.new_ids) for c in ctx)
    seen = {i for c in ctx for i in c.new_ids if i >= len(base)}
    assert len(seen) >= 0.9 * len(ext.new_tokens)
    for c in ctx[:10]:
        # an aligned pair ends at the same character: the decoded prefixes are equal
        for i, j in list(zip(c.new_pos, c.old_pos))[:5]:
            assert ext.tokenizer.decode(c.new_ids[:i + 1]) == base.decode(c.old_ids[:j + 1])
    with pytest.raises(ValueError, match="`init=distill` needs domain texts"):
        mine_distill_contexts(["", " "], base, ext.tokenizer, len(base))


@pytest.mark.slow  # token-distillation training (~46 s under load)
def test_distill_lowers_the_mismatch_deterministically(setup):
    dom, base, ext = setup
    torch.manual_seed(0)
    model = make_tiny_llama(len(base))
    old = model.get_input_embeddings().weight.detach().clone()
    ctx = mine_distill_contexts(dom, base, ext.tokenizer, len(base), per_token=2, length=24)
    pieces = [base(ext.tokenizer.convert_tokens_to_string([t]), add_special_tokens=False)["input_ids"]
              for t in ext.new_tokens]
    start = init_subword_mean(old, pieces)
    before = distill_mismatch(model, old, start, ctx, batch_size=4)
    rows, stats = init_distill(model, old, start, ctx, steps=3, lr=1e-2, batch_size=4, progress=False)
    rows2, _ = init_distill(model, old, start, ctx, steps=3, lr=1e-2, batch_size=4, progress=False)
    assert torch.equal(rows, rows2)
    after = distill_mismatch(model, old, rows, ctx, batch_size=4)
    assert after < 0.8 * before
    assert torch.equal(model.get_input_embeddings().weight, old)  # the model is only read
    assert all(p.requires_grad for p in model.parameters())
    # the batched, early-exit loss equals a direct per-snippet computation (block 1's output)
    ref = torch.stack(naive_mismatch(model, old, rows, ctx[:4]))
    one = distill_mismatch(model, old, rows, ctx[:4], batch_size=1, layer=1, precision="float32")
    torch.testing.assert_close(torch.tensor(one), ref.mean(), rtol=1e-4, atol=1e-8)


@pytest.mark.slow  # token distillation in three precisions (~62 s under load)
def test_precision_auto_float32_bfloat16(setup):
    dom, base, ext = setup
    torch.manual_seed(0)
    model = make_tiny_llama(len(base))
    fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_precision(model, "auto") == ("bfloat16" if fast else "float32")
    assert resolve_precision(model, "float32") == "float32"
    assert resolve_precision(model.to(torch.bfloat16), "auto") == "float32"  # already bfloat16: no autocast
    model = model.float()
    with pytest.raises(ValueError, match="`distill_precision` must be one of auto, float32, bfloat16"):
        resolve_precision(model, "fp8")
    with pytest.raises(ValueError, match="`distill_precision`"):
        VocabConfig(distill_precision="half")
    old = model.get_input_embeddings().weight.detach().clone()
    ctx = mine_distill_contexts(dom, base, ext.tokenizer, len(base), per_token=2, length=24)
    pieces = [base(ext.tokenizer.convert_tokens_to_string([t]), add_special_tokens=False)["input_ids"]
              for t in ext.new_tokens]
    start = init_subword_mean(old, pieces)
    rows = {}
    for precision in ("float32", "bfloat16"):
        rows[precision], stats = init_distill(model, old, start, ctx, steps=3, lr=1e-2, batch_size=4,
                                              precision=precision, progress=False)
        assert stats["bfloat16"] == float(precision == "bfloat16") and rows[precision].dtype == old.dtype
    # both precisions lower the float32 mismatch by about as much
    before = distill_mismatch(model, old, start, ctx, batch_size=4, precision="float32")
    after = {k: distill_mismatch(model, old, r, ctx, batch_size=4, precision="float32") for k, r in rows.items()}
    assert after["float32"] < 0.8 * before and after["bfloat16"] < 0.8 * before
    assert abs(after["bfloat16"] - after["float32"]) < 0.1 * (before - after["float32"])


def test_extend_model_distill_keeps_old_rows_and_reloads(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    dom, base, ext = setup
    model = make_tiny_llama(len(base))
    old = model.get_input_embeddings().weight.detach().clone()
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, "distill", old_tokenizer=base, texts=dom,
                         distill_steps=2, distill_lr=1e-2, progress=False)
    w = model.get_input_embeddings().weight.detach()
    assert torch.equal(w[:len(base)], old) and stats["distill_contexts"] > 0
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied: follows
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.get_input_embeddings().weight, w)


def test_untied_output_rows_are_subword_means(setup):
    from transformers import LlamaForCausalLM

    dom, base, ext = setup
    cfg = make_tiny_llama(len(base)).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    old_out = model.lm_head.weight.detach().clone()
    extend_model(model, ext.tokenizer, ext.new_tokens, "distill", old_tokenizer=base, texts=dom, progress=False)
    pieces = [base(ext.tokenizer.convert_tokens_to_string([t]), add_special_tokens=False)["input_ids"]
              for t in ext.new_tokens]
    assert torch.equal(model.lm_head.weight[:len(base)], old_out)
    torch.testing.assert_close(model.lm_head.weight[len(base):].detach(), init_subword_mean(old_out, pieces))


def test_distill_errors(setup):
    dom, base, ext = setup
    with pytest.raises(ValueError, match="`init=distill` needs a domain corpus"):
        extend_model(make_tiny_llama(len(base)), ext.tokenizer, ext.new_tokens, "distill", old_tokenizer=base)
    for field, value in [("distill_contexts", 0), ("distill_contexts", -3), ("distill_steps", 0),
                         ("distill_lr", 0), ("distill_context_length", 2), ("distill_layer", 0)]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            VocabConfig(**{field: value})
    with pytest.raises(ValueError, match="corpus is empty"):
        extend_vocabulary(make_tiny_llama(len(base)), base, VocabConfig(n_new_tokens=5, init="distill"), [])
