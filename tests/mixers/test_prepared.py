"""PreparedMixer: the on-the-fly ReplayMixer's blocks from a pretokenized store, built from their index alone."""

import itertools
import json
import os

import datasets
import numpy as np
import pytest
import torch

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.mixers import prepared as prepared_mod
from hf_cpt.mixers.core import RatioStage, assign_blocks
from hf_cpt.mixers.prepared import MANIFEST, PreparedMixer, PreparedStore, build_mix_schedule
from hf_cpt.mixers.replay import ReplayMixer, ReplayMixerConfig
from hf_cpt.recipe.prepare import prepare_sources
from hf_cpt.testing import make_tiny_llama, read_embedded


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    """Two small corpora (with blank documents, which the mixers skip) and their prepared store."""
    d = tmp_path_factory.mktemp("prepared")
    domain = read_embedded("python-docs", limit=12)
    general = read_embedded("kjv", limit=6)
    domain[3], general[1] = "   ", ""
    files = {"domain": write_jsonl(d / "domain.jsonl", domain), "general": write_jsonl(d / "general.jsonl", general)}
    store = prepare_sources(files, tiny_tokenizer, d / "store")
    texts = {n: datasets.load_dataset("json", data_files=f, split="train") for n, f in files.items()}
    return {"dir": d, "files": files, "store": store, "texts": texts}


def reference_blocks(corpus, tok, cfg, n, keys=("input_ids",)):
    mixer = ReplayMixer(corpus["texts"], tok, cfg)
    pick = (lambda b: b["input_ids"]) if keys == ("input_ids",) else (lambda b: {k: b[k] for k in keys})
    blocks = [pick(b) for b in itertools.islice(iter(mixer), n)]
    while cfg.on_exhausted == "stop" and len(blocks) < n:  # the next mix pass (the Trainer's next epoch)
        blocks += [pick(b) for b in itertools.islice(iter(mixer), n - len(blocks))]
    return blocks


CONFIGS = {
    "block": {},
    "token": {"granularity": "token"},
    "stop": {"on_exhausted": "stop"},
    "stop-token": {"on_exhausted": "stop", "granularity": "token"},
    "stages": {"stages": [RatioStage(0.4, replay_ratio=0.6), RatioStage(0.7, replay_ratio=0.0)], "total_blocks": 120},
    "no-shuffle-10pct": {"shuffle": False, "ratios": {"domain": 0.9, "general": 0.1}},
    "three-passes": {"ratios": {"domain": 0.2, "general": 0.8}, "seed": 7},
    "concat": {"packing": "concat"},
    "concat-token": {"packing": "concat", "granularity": "token"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prepared_blocks_equal_on_the_fly_blocks(corpus, tiny_tokenizer, name):
    cfg = ReplayMixerConfig(**{"ratios": {"domain": 0.75, "general": 0.25}, "block_size": 32, **CONFIGS[name]})
    n = 120 if name != "stop" else 1300  # `stop`: past the end of the first mix pass
    keys = ("input_ids", "labels", "attention_mask" if cfg.packing == "concat" else "position_ids")
    want = reference_blocks(corpus, tiny_tokenizer, cfg, n, keys)
    mixer = PreparedMixer(corpus["store"], cfg, num_blocks=n, cache_schedule=False)
    got = [{k: mixer[i][k].tolist() for k in keys} for i in range(n)]
    assert got == want
    assert set(mixer[0]) == set(keys)  # no attention_mask with `documents`, no position_ids with `concat`


def test_token_sources_and_block_index_match_the_on_the_fly_mixer(corpus, tiny_tokenizer):
    cfg = ReplayMixerConfig(ratios={"domain": 0.7, "general": 0.3}, block_size=32, granularity="token",
                            emit_sources=True)
    ref = list(itertools.islice(iter(ReplayMixer(corpus["texts"], tiny_tokenizer, cfg)), 20))
    mixer = PreparedMixer(corpus["store"], cfg, num_blocks=20, cache_schedule=False)
    for i, want in enumerate(ref):
        got = mixer[i]
        assert got["block_index"] == want["block_index"] == i
        assert got["source_ids"].tolist() == want["source_ids"]
        assert got["labels"].tolist() == want["labels"] and got["position_ids"].tolist() == want["position_ids"]
        assert "attention_mask" not in got


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_rank_builds_only_its_own_blocks(corpus, world_size):
    cfg = ReplayMixerConfig(ratios={"domain": 0.75, "general": 0.25}, block_size=32)
    whole = PreparedMixer(corpus["store"], cfg, num_blocks=48, cache_schedule=False)
    one_rank = [b["input_ids"].tolist() for b in whole.iter_blocks(0, 48)]
    for rank in range(world_size):
        mixer = PreparedMixer(corpus["store"], cfg, num_blocks=48, cache_schedule=False)
        mine = [b["input_ids"].tolist() for b in mixer.iter_blocks(0, 48, rank=rank, world_size=world_size)]
        assert mine == one_rank[rank::world_size]
        assert mixer.blocks_built == len(one_rank[rank::world_size])  # the others' blocks were never built


def test_resume_is_a_seek_and_accepts_on_the_fly_states(corpus, tiny_tokenizer):
    cfg = ReplayMixerConfig(ratios={"domain": 0.75, "general": 0.25}, block_size=32)
    mixer = PreparedMixer(corpus["store"], cfg, num_blocks=200, cache_schedule=False)
    state = mixer.state_at(137)
    fresh = PreparedMixer(corpus["store"], cfg, num_blocks=200, cache_schedule=False)
    fresh.load_state_dict(state)
    assert fresh[0]["input_ids"].tolist() == mixer.block(137)["input_ids"].tolist()
    assert fresh.blocks_built == 1  # nothing before block 137 was rebuilt
    assert fresh.tokens_per_source == {"domain": 103 * 32, "general": 34 * 32}  # token-exact shares
    # a checkpoint of the on-the-fly mixer continues on the prepared one (same blocks, same numbering)
    ref = ReplayMixer(corpus["texts"], tiny_tokenizer, cfg)
    it = iter(ref)
    for _ in range(10):
        next(it)
    fresh.load_state_dict(ref.state_at(10))
    assert fresh[0]["input_ids"].tolist() == next(it)["input_ids"]
    other = PreparedMixer(corpus["store"], ReplayMixerConfig(ratios={"domain": 0.5, "general": 0.5}, block_size=32),
                          num_blocks=200, cache_schedule=False)
    with pytest.raises(ValueError, match="configured differently"):
        other.load_state_dict(state)


def test_schedule_is_cached_next_to_the_store_and_read_back(corpus, monkeypatch):
    cfg = ReplayMixerConfig(ratios={"domain": 0.6, "general": 0.4}, block_size=32, seed=3)
    first = PreparedMixer(corpus["store"], cfg, num_blocks=64)
    assert list((corpus["store"] / "schedules").glob("*.npy"))

    def no_planning(*args, **kwargs):
        raise AssertionError("the cached schedule should have been read")

    monkeypatch.setattr(prepared_mod, "build_mix_schedule", no_planning)
    again = PreparedMixer(corpus["store"], cfg, num_blocks=50)
    assert again[49]["input_ids"].tolist() == first[49]["input_ids"].tolist()


def test_schedule_block_sources_match_assign_blocks():
    ratios = {"a": 0.55, "b": 0.3, "c": 0.15}
    starts, taken = build_mix_schedule(ratios, 97, [10**9] * 3, block_size=8)
    counts = np.diff(taken, axis=0)
    want = assign_blocks(97, ratios)
    assert [list(ratios)[int(np.argmax(row))] for row in counts] == want
    assert (counts.sum(axis=1) == 8).all() and (starts == taken[:-1]).all()


def test_stop_with_a_source_shorter_than_a_block_is_refused():
    with pytest.raises(ValueError, match="fewer than one block"):
        build_mix_schedule({"a": 0.3, "b": 0.7}, 5, [100, 3], block_size=8, on_exhausted="stop")


def test_missing_stale_and_truncated_stores_are_refused(corpus, tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="`data.prepared_dir`.*does not exist"):
        PreparedStore(tmp_path / "nowhere", field="data.prepared_dir")
    good = PreparedStore(corpus["store"])
    with pytest.raises(ValueError, match="another tokenizer"):
        PreparedStore(corpus["store"], {**good.fingerprint, "tokenizer": "0" * 64})
    moved = json.loads(json.dumps(good.fingerprint))
    moved["sources"]["general"]["files"][0][1] += 1
    with pytest.raises(ValueError, match="other or changed files for source 'general'"):
        PreparedStore(corpus["store"], moved)
    # a truncated Arrow file
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(corpus["store"], cut)
    arrow = next((cut / "domain").glob("*.arrow"))
    os.truncate(arrow, os.path.getsize(arrow) // 2)
    with pytest.raises(ValueError, match="`prepared_dir`: .*truncated or damaged"):
        PreparedStore(cut)
    # a manifest that disagrees with the data (e.g. a source file swapped by hand)
    shutil.rmtree(cut)
    shutil.copytree(corpus["store"], cut)
    manifest = json.loads((cut / MANIFEST).read_text())
    manifest["sources"]["general"]["tokens"] += 5
    (cut / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="source 'general' in the store has .* truncated or damaged"):
        PreparedStore(cut)


def test_bad_mixer_arguments(corpus):
    with pytest.raises(ValueError, match="`num_blocks`"):
        PreparedMixer(corpus["store"], ratios={"domain": 1.0}, num_blocks=0)
    with pytest.raises(ValueError, match="does not hold"):
        PreparedMixer(corpus["store"], ratios={"domain": 0.5, "code": 0.5}, num_blocks=4)
    mixer = PreparedMixer(corpus["store"], ratios={"domain": 1.0}, block_size=32, num_blocks=4, cache_schedule=False)
    with pytest.raises(IndexError):
        mixer[4]


def _train(store, out, max_steps, workers, resume=None, save_steps=0):
    from transformers import Trainer, TrainingArguments, default_data_collator

    tok_vocab = 384
    cfg = ReplayMixerConfig(ratios={"domain": 0.75, "general": 0.25}, block_size=32)
    mixer = PreparedMixer(store, cfg, num_blocks=max_steps * 4, cache_schedule=False)
    seen = []
    model = make_tiny_llama(tok_vocab)
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].tolist()) if m.training else None, with_kwargs=True)
    args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none",
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, lr_scheduler_type="constant", use_cpu=True, seed=0,
                             dataloader_num_workers=workers, train_sampling_strategy="sequential",
                             ignore_data_skip=True, restore_callback_states_from_checkpoint=True)
    trainer = Trainer(model=model, args=args, train_dataset=mixer, data_collator=default_data_collator,
                      callbacks=[ReplayMixerCallback(mixer)])
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seen


@pytest.mark.slow  # dataloader worker processes and a resume
def test_dataloader_workers_and_resume_are_bitwise_exact(corpus, tmp_path):
    ref, seen_ref = _train(corpus["store"], tmp_path / "ref", 6, workers=0)
    full, seen = _train(corpus["store"], tmp_path / "w", 6, workers=2, save_steps=3)
    assert seen == seen_ref
    resumed, seen_resumed = _train(corpus["store"], tmp_path / "again", 6, workers=2,
                                   resume=str(tmp_path / "w" / "checkpoint-3"))
    assert seen_resumed == seen_ref[len(seen_ref) // 2:]  # the second half, nothing replayed
    for k in ref:
        assert torch.equal(ref[k], full[k]) and torch.equal(ref[k], resumed[k]), k


def test_random_sampling_is_refused(corpus, tmp_path):
    from transformers import Trainer, TrainingArguments

    mixer = PreparedMixer(corpus["store"], ratios={"domain": 1.0}, block_size=32, num_blocks=8,
                          cache_schedule=False)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=make_tiny_llama(384), args=args, train_dataset=mixer,
                      callbacks=[ReplayMixerCallback(mixer)])
    with pytest.raises(ValueError, match="train_sampling_strategy='sequential'"):
        trainer.train()


def test_documents_are_read_across_arrow_chunks(tmp_path):
    from hf_cpt.mixers.prepared import PreparedSource

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 1000, size=int(rng.integers(0, 9))).tolist() for _ in range(700)]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    datasets.Dataset.from_dict({"input_ids": rows}, features=features).save_to_disk(str(tmp_path / "d"),
                                                                                     max_shard_size="2KB")
    ds = datasets.load_from_disk(str(tmp_path / "d"))
    assert ds.data.column("input_ids").num_chunks > 3
    src = PreparedSource("x", ds, len(rows), sum(map(len, rows)), "prepared_dir")
    assert src.lengths.tolist() == [len(r) for r in rows]
    for d in range(len(rows)):
        assert src.doc_tokens(d, 0, len(rows[d])).tolist() == rows[d]
        if len(rows[d]) >= 3:
            assert src.doc_tokens(d, 1, 3).tolist() == rows[d][1:3]


def test_the_tokenizer_fingerprint_ignores_truncation_state_left_on_the_backend(tiny_tokenizer):
    """A call with `truncation=True` leaves truncation on the shared fast backend until the next plain call resets
    it; a store prepared in between must not look like one made with another tokenizer."""
    from hf_cpt.mixers.prepared import tokenizer_fingerprint

    plain = tokenizer_fingerprint(tiny_tokenizer)
    tiny_tokenizer("some text to cut", truncation=True, max_length=3)
    try:
        assert tiny_tokenizer.backend_tokenizer.truncation is not None  # the state this guards against
        assert tokenizer_fingerprint(tiny_tokenizer) == plain
    finally:
        tiny_tokenizer.backend_tokenizer.no_truncation()
    assert tokenizer_fingerprint(tiny_tokenizer) == plain
