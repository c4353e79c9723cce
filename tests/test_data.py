import json

import pytest

from hf_cpt.config import DataConfig, SourceConfig
from hf_cpt.mixers import ReplayMixer
from hf_cpt.recipe.data import (
    build_eval_sets,
    build_train_set,
    embedded_corpus_path,
    load_split,
    pack_blocks,
    resolve_data_files,
    tokenize_and_pack,
)


def naive_pack(docs, block, sep):
    flat = []
    for d in docs:
        flat += list(d) + ([sep] if sep is not None else [])
    n = len(flat) // block
    return [flat[i * block:(i + 1) * block] for i in range(n)]


@pytest.mark.parametrize("block", [1, 3, 7, 16])
@pytest.mark.parametrize("sep", [None, 0])
def test_pack_blocks_matches_naive_reference(block, sep):
    docs = [[5, 6, 7], [], [8] * 11, [9, 10]]
    assert pack_blocks(docs, block, sep) == naive_pack(docs, block, sep)


def test_embedded_corpora_are_shipped_with_licences():
    for name in ("python-docs", "kjv"):
        for split in ("train", "validation"):
            path = embedded_corpus_path(f"embedded:{name}/{split}")
            assert path.is_file() and path.stat().st_size > 10_000
        assert (path.parent / "LICENSE").is_file()
    with pytest.raises(ValueError, match="unknown embedded corpus"):
        embedded_corpus_path("embedded:wiki/train")


def test_resolve_data_files_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`data.domain.train`: no data file found"):
        resolve_data_files(str(tmp_path / "missing.jsonl"), "data.domain.train")
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(ValueError, match="`data.general.train`"):
        resolve_data_files(str(tmp_path / "a.docx"), "data.general.train")
    for i in range(2):
        (tmp_path / f"p{i}.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    builder, files = resolve_data_files(str(tmp_path / "p*.jsonl"), "f")
    assert builder == "json" and len(files) == 2


def test_missing_text_field_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    src = SourceConfig(train=str(path))
    with pytest.raises(ValueError, match=r"`data.domain.text_field`: column 'text' not found"):
        load_split(str(path), src, "data.domain.train")


def test_text_files_load_too(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("line one\nline two\n")
    ds = load_split(str(path), SourceConfig(train=str(path)), "data.domain.train")
    assert ds["text"] == ["line one", "line two"]


def test_tokenize_and_pack_gives_full_blocks_with_labels(tiny_tokenizer):
    ds = load_split("embedded:kjv/validation", SourceConfig("embedded:kjv/validation"), "x")
    concat = tokenize_and_pack(ds, tiny_tokenizer, "text", 48, packing="concat")
    assert len(concat) > 10
    row = concat[3]
    assert len(row["input_ids"]) == 48 and row["labels"] == row["input_ids"] and sum(row["attention_mask"]) == 48
    # documents are separated by EOS, as in pretraining
    assert tiny_tokenizer.eos_token_id in sum(concat["input_ids"], [])
    # the default packs by document: the same tokens (no BOS in this tokenizer), positions restarting after EOS
    blocks = tokenize_and_pack(ds, tiny_tokenizer, "text", 48)
    assert blocks["input_ids"] == concat["input_ids"] and "attention_mask" not in blocks.column_names
    eos = tiny_tokenizer.eos_token_id
    for ids, pos, labels in zip(blocks["input_ids"], blocks["position_ids"], blocks["labels"]):
        for t in range(1, 48):
            restart = ids[t - 1] == eos
            assert (pos[t] == 0) == restart and (labels[t] == -100) == restart
            assert restart or pos[t] == pos[t - 1] + 1


@pytest.mark.slow  # tokenizes the embedded corpora (>5 s under load)
def test_build_train_set_is_a_token_exact_mixer(tiny_tokenizer):
    cfg = DataConfig(replay_ratio=0.25, block_size=32)
    train = build_train_set(cfg, tiny_tokenizer)
    assert isinstance(train, ReplayMixer) and train.config.ratios == {"domain": 0.75, "general": 0.25}
    it = iter(train)
    rows = [next(it) for _ in range(40)]
    assert all(len(r["input_ids"]) == 32 for r in rows)
    assert train.tokens_per_source == {"domain": 30 * 32, "general": 10 * 32}
    again = iter(build_train_set(cfg, tiny_tokenizer))
    assert [next(again) for _ in range(40)] == rows


def test_streaming_sources_give_the_same_token_shares(tiny_tokenizer):
    cfg = DataConfig(
        domain=SourceConfig("embedded:python-docs/validation", streaming=True),
        general=SourceConfig("embedded:kjv/validation", streaming=True),
        replay_ratio=0.5, block_size=32,
    )
    train = build_train_set(cfg, tiny_tokenizer)
    it = iter(train)
    rows = [next(it) for _ in range(12)]
    assert all(len(r["input_ids"]) == 32 for r in rows)
    assert train.tokens_per_source == {"domain": 6 * 32, "general": 6 * 32}


def test_replay_stages_change_the_share_late_in_the_run(tiny_tokenizer):
    cfg = DataConfig(replay_ratio=0.5, block_size=16, replay_stages=[{"start": 0.5, "replay_ratio": 0.0}])
    train = build_train_set(cfg, tiny_tokenizer, total_blocks=20)
    it = iter(train)
    for _ in range(10):
        next(it)
    assert train.tokens_per_source == {"domain": 5 * 16, "general": 5 * 16}
    for _ in range(10):
        next(it)
    assert train.tokens_per_source == {"domain": 15 * 16, "general": 5 * 16}
    with pytest.raises(ValueError, match="needs the run length"):
        build_train_set(cfg, tiny_tokenizer)


def test_eval_sets_are_capped_and_named(tiny_tokenizer):
    sets = build_eval_sets(DataConfig(block_size=32, max_eval_blocks=5), tiny_tokenizer)
    assert set(sets) == {"general", "domain"}
    assert all(len(s) == 5 for s in sets.values())


def test_an_empty_training_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text("")
    cfg = DataConfig(domain=SourceConfig(str(path), str(path)), general=None, replay_ratio=0.0, block_size=64)
    with pytest.raises(ValueError, match="`data.domain.train`: .* (holds no documents|could not be read)"):
        build_train_set(cfg, tiny_tokenizer)
