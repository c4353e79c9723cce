import json
import random

import datasets
import numpy as np
import pytest

from hf_cpt.mixers import RatioStage, ReplayMixer, ReplayMixerConfig, allocate_shares, assign_blocks, ratios_at


class NumberTokenizer:
    """Whitespace 'tokenizer' whose ids are the numbers in the text: provenance of every token is readable."""

    eos_token_id = 0
    sep_token_id = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    def __len__(self):
        return 1_000_000


TOK = NumberTokenizer()


class NoEosTokenizer(NumberTokenizer):
    eos_token_id = None  # no separator: every token's source is exact


def make_docs(first_id, n_docs, length, jitter=0, seed=0):
    """Documents of distinct ids; ids of source k lie in [first_id, first_id + 100_000)."""
    rng = random.Random(seed)
    docs, next_id = [], first_id
    for _ in range(n_docs):
        n = max(1, length + rng.randint(-jitter, jitter))
        docs.append(" ".join(str(next_id + i) for i in range(n)))
        next_id += n
    assert next_id < first_id + 100_000
    return docs


def source_of(tok_id):
    return None if tok_id == 0 else ("domain" if tok_id < 200_000 else "general")


def skewed_sources():
    # general documents are 10x longer than domain documents
    return {"domain": make_docs(100_000, 300, 20, jitter=10), "general": make_docs(200_000, 60, 200, jitter=100)}


def token_shares(blocks):
    """Share of each source's tokens per block; the EOS after a document belongs to the document before it."""
    out = []
    for b in blocks:
        ids = b["input_ids"]
        last, counts = None, {"domain": 0, "general": 0}
        for t in ids:
            src = source_of(t) or last
            if src is None:  # a block starting with EOS: attribute it to the next token's source
                src = next(source_of(x) for x in ids if source_of(x))
            counts[src] += 1
            last = src
        out.append(counts)
    return out


def take(mixer, n):
    it = iter(mixer)
    return [next(it) for _ in range(n)]


# --- pure core -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratios", [{"a": 0.75, "b": 0.25}, {"a": 0.123, "b": 0.877}, {"a": 0.5, "b": 0.3, "c": 0.2},
                                    {"a": 0.0, "b": 1.0}, {"a": 0.01, "b": 0.33, "c": 0.33, "d": 0.33}])
@pytest.mark.parametrize("amount", [1, 7, 128])
def test_allocation_tracks_exact_shares_within_one_unit(ratios, amount):
    credits, got = {}, {k: 0 for k in ratios}
    for step in range(1, 600):
        alloc, credits = allocate_shares(credits, ratios, amount)
        assert sum(alloc.values()) == amount and all(v >= 0 for v in alloc.values())
        for k in ratios:
            got[k] += alloc[k]
            # naive reference: the exact share after `step` allocations
            assert abs(got[k] - ratios[k] * amount * step) < 1.0 + 1e-6


def test_assign_blocks_spreads_replay_evenly():
    seq = assign_blocks(8, {"domain": 0.75, "general": 0.25})
    assert seq.count("general") == 2 and "general" not in seq[:2]
    assert all(seq[i:i + 4].count("general") == 1 for i in range(0, 8, 4))


def test_ratios_at_switches_at_stage_starts():
    stage = RatioStage(start=0.8, ratios={"d": 1.0, "g": 0.0})
    base = {"d": 0.5, "g": 0.5}
    assert ratios_at(79, base, [stage], 100) == base
    assert ratios_at(80, base, [stage], 100) == {"d": 1.0, "g": 0.0}


# --- the mixer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["block", "token"])
def test_token_share_error_is_below_half_a_percent_on_skewed_lengths(granularity):
    ratio = 0.25 if granularity == "block" else 0.123  # token granularity is exact for any share
    mixer = ReplayMixer(skewed_sources(), NoEosTokenizer(), ratios={"domain": 1 - ratio, "general": ratio},
                        block_size=64, granularity=granularity)
    blocks = take(mixer, 600)
    assert all(len(b["input_ids"]) == 64 and all(lab in (-100, i) for lab, i in zip(b["labels"], b["input_ids"]))
               for b in blocks)
    shares = token_shares(blocks)
    general = np.array([s["general"] for s in shares], dtype=float)
    assert all(s["domain"] + s["general"] == 64 for s in shares)
    for start in range(0, len(blocks) - 100 + 1):
        window = general[start:start + 100].sum() / (100 * 64)
        assert abs(window - ratio) <= 0.005, (start, window)
    assert mixer.tokens_per_source == {"domain": int(600 * 64 - general.sum()), "general": int(general.sum())}


def test_document_interleaving_would_fail_the_same_check():
    """The check above can fail: drawing *documents* at 0.25 (what interleave_datasets does) gives ~3x the tokens."""
    src = skewed_sources()
    rng = random.Random(0)
    tokens = {"domain": 0, "general": 0}
    for _ in range(2000):
        name = "general" if rng.random() < 0.25 else "domain"
        tokens[name] += len(rng.choice(src[name]).split()) + 1
    assert tokens["general"] / sum(tokens.values()) > 0.6


def test_every_document_is_read_once_per_pass_in_a_seeded_order():
    src = {"domain": make_docs(100_000, 50, 5), "general": make_docs(200_000, 50, 5)}
    mixer = ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=16, seed=3)
    ids = [t for b in take(mixer, 18) for t in b["input_ids"]]  # 144 domain tokens < one pass (300)
    domain = [t for t in ids if 100_000 <= t < 200_000]
    assert len(set(ids) - {0}) == len([t for t in ids if t != 0])  # no token repeated within a pass
    assert domain != sorted(domain)  # documents are shuffled
    assert [t for b in take(mixer, 18) for t in b["input_ids"]] == ids  # each iteration starts at the start
    again = [t for b in take(ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=16, seed=3),
                                 18) for t in b["input_ids"]]
    other = [t for b in take(ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=16, seed=4),
                                 18) for t in b["input_ids"]]
    assert ids == again and ids != other


def test_sources_cycle_with_a_new_order_per_pass():
    src = {"domain": make_docs(100_000, 4, 3), "general": make_docs(200_000, 4, 3)}
    mixer = ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=4)
    blocks = take(mixer, 42)  # 84 tokens per source, 16 per pass
    state = mixer.state_dict()
    assert state["sources"]["domain"]["pass"] == 5 and state["sources"]["general"]["pass"] == 5
    domain = [t for b in blocks for t in b["input_ids"] if 100_000 <= t < 200_000]
    passes = [tuple(domain[i:i + 12]) for i in range(0, 60, 12)]  # 12 non-EOS tokens per pass
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and len(set(passes)) > 1


def test_stop_mode_ends_the_mix_when_a_source_runs_out():
    src = {"domain": make_docs(100_000, 10, 7), "general": make_docs(200_000, 2, 7)}
    mixer = ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=8, on_exhausted="stop")
    blocks = list(mixer)
    # general has 16 tokens (with EOS): D G D G D, then the third general block cannot be filled
    assert [source_of(b["input_ids"][0]) or "general" for b in blocks] == ["domain", "general"] * 2 + ["domain"]
    assert len(list(mixer)) == 5  # another pass over the whole mix, like any finite dataset


def stream(docs):
    def gen():
        for d in docs:
            yield {"text": d, "id": 1}
    return datasets.IterableDataset.from_generator(gen)


@pytest.mark.parametrize("kind", ["list", "dataset", "streaming"])
@pytest.mark.parametrize("granularity", ["block", "token"])
def test_resume_from_state_continues_the_exact_stream(kind, granularity):
    raw = {"domain": make_docs(100_000, 40, 9, jitter=8), "general": make_docs(200_000, 15, 30, jitter=20)}
    wrap = {"list": lambda d: d, "dataset": lambda d: datasets.Dataset.from_dict({"text": d}),
            "streaming": stream}[kind]

    def fresh():
        return ReplayMixer({k: wrap(v) for k, v in raw.items()}, TOK, ratios={"domain": 0.7, "general": 0.3},
                           block_size=32, granularity=granularity,
                           stages=[RatioStage(0.5, {"domain": 0.9, "general": 0.1})], total_blocks=120)

    full = take(fresh(), 120)  # several passes over both sources, across the stage switch
    for cut in (1, 37, 59, 60, 101):
        first = fresh()
        take(first, cut + 3)  # read ahead, as a dataloader prefetching does
        state = json.loads(json.dumps(first.state_at(cut)))
        resumed = fresh()
        resumed.load_state_dict(state)
        assert take(resumed, 120 - cut) == full[cut:], cut


def test_resume_refuses_a_changed_configuration():
    src = {"domain": make_docs(100_000, 20, 9), "general": make_docs(200_000, 20, 9)}
    mixer = ReplayMixer(src, TOK, ratios={"domain": 0.75, "general": 0.25}, block_size=16)
    take(mixer, 5)
    state = mixer.state_dict()
    changed = ReplayMixer(src, TOK, ratios={"domain": 0.5, "general": 0.5}, block_size=16)
    with pytest.raises(ValueError, match=r"configured differently \(ratios: .*strict=False"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, strict=False)  # explicit override: keep positions, new shares from here
    assert changed.state_dict()["sources"] == state["sources"]
    assert mixer.state_at(2)["blocks"] == 2
    with pytest.raises(ValueError, match="no record of block 9"):
        mixer.state_at(9)


def test_two_ranks_get_disjoint_shards_covering_the_stream():
    src = skewed_sources()
    kw = dict(ratios={"domain": 0.75, "general": 0.25}, block_size=32)
    full = take(ReplayMixer(src, TOK, **kw), 40)
    r0 = take(ReplayMixer(src, TOK, rank=0, world_size=2, **kw), 20)
    r1 = take(ReplayMixer(src, TOK, rank=1, world_size=2, **kw), 20)
    assert r0 == full[0::2] and r1 == full[1::2]
    assert not {tuple(b["input_ids"]) for b in r0} & {tuple(b["input_ids"]) for b in r1}


def test_bad_input_is_a_clear_error():
    src = {"domain": ["1 2 3"], "general": ["200001 200002"]}
    with pytest.raises(ValueError, match=r"`ratios` must sum to 1"):
        ReplayMixer(src, TOK, ratios={"domain": 0.7, "general": 0.2})
    with pytest.raises(ValueError, match=r"`ratios.general` must be a share >= 0"):
        ReplayMixer(src, TOK, ratios={"domain": 1.2, "general": -0.2})
    with pytest.raises(ValueError, match=r"no data for \['general'\]"):
        ReplayMixer({"domain": ["1"]}, TOK, ratios={"domain": 0.5, "general": 0.5})
    with pytest.raises(ValueError, match="source 'general' is empty"):
        ReplayMixer({"domain": ["1"], "general": []}, TOK, ratios={"domain": 0.5, "general": 0.5})
    with pytest.raises(ValueError, match="source 'general' produced no text"):
        take(ReplayMixer({"domain": ["1 2"], "general": ["  ", ""]}, TOK, ratios={"domain": 0.5, "general": 0.5},
                         block_size=2), 4)
    with pytest.raises(ValueError, match=r"column 'text' not found .* set `text_field`"):
        ReplayMixer({"domain": datasets.Dataset.from_dict({"body": ["1"]})}, TOK, ratios={"domain": 1.0})
    with pytest.raises(ValueError, match=r"has no 'text' field"):
        take(ReplayMixer({"domain": [{"body": "1"}]}, TOK, ratios={"domain": 1.0}, block_size=1), 1)
    with pytest.raises(ValueError, match="`total_blocks` must be set"):
        ReplayMixerConfig(ratios={"a": 1.0}, stages=[RatioStage(0.5, {"a": 1.0})])
    with pytest.raises(ValueError, match="`granularity` must be one of"):
        ReplayMixerConfig(ratios={"a": 1.0}, granularity="doc")


@pytest.mark.parametrize("bad", [None, 7, ["1", "2"]])
def test_a_text_that_is_not_a_string_is_refused_not_dropped(bad):
    """Rows past the up-front row check (streams, Hub datasets, a large corpus) meet the same rule in the mixer:
    a blank text is skipped, anything but a string stops the run naming `text_field` and the source."""
    mixer = ReplayMixer({"domain": [{"text": "1 2 3"}, {"text": "  "}, {"text": bad}, {"text": "4 5"}]}, TOK,
                        ratios={"domain": 1.0}, block_size=2)
    with pytest.raises(ValueError, match=r"`text_field`: a row of source 'domain' holds .* not a string"):
        take(mixer, 4)
