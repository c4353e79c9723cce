"""`prepare_sources` / `hf-cpt prepare`: the pretokenized store, its fingerprint, and training from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_cpt.config import CPTConfig, DataConfig, SourceConfig
from hf_cpt.mixers.prepared import MANIFEST, PreparedMixer
from hf_cpt.recipe import prepare as prepare_mod
from hf_cpt.recipe import run_cpt
from hf_cpt.recipe.data import build_train_set
from hf_cpt.recipe.prepare import prepare_config, prepare_sources
from hf_cpt.testing import make_tiny_tokenizer, read_embedded

from ..conftest import invoke_like_main, tiny_run_dict

pytestmark = pytest.mark.timeout(600)


def _files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, corpus, n in (("domain", "python-docs", 8), ("general", "kjv", 8)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_embedded(corpus, limit=n)))
        out[name] = str(path)
    return out


def _staging_leftovers(final: Path) -> list[Path]:
    return list(final.parent.glob(f".{final.name}.tmp-*"))


def test_prepare_writes_a_store_once_and_refuses_a_stale_one(tmp_path, tiny_tokenizer):
    files = _files(tmp_path)
    store = prepare_sources(files, tiny_tokenizer, tmp_path / "store")
    manifest = json.loads((store / MANIFEST).read_text())
    assert set(manifest["sources"]) == {"domain", "general"} and manifest["sources"]["domain"]["documents"] == 8
    stamp = (store / MANIFEST).stat().st_mtime_ns
    assert prepare_sources(files, tiny_tokenizer, store) == store  # up to date: kept as it is
    assert (store / MANIFEST).stat().st_mtime_ns == stamp
    other = make_tiny_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match="prepared with another tokenizer; pass `overwrite=True`"):
        prepare_sources(files, other, store)
    Path(files["general"]).write_text(json.dumps({"text": "changed"}) + "\n")
    with pytest.raises(ValueError, match="other or changed files for source 'general'"):
        prepare_sources(files, tiny_tokenizer, store)
    prepare_sources(files, tiny_tokenizer, store, overwrite=True)
    assert json.loads((store / MANIFEST).read_text())["sources"]["general"]["documents"] == 1
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a prepared store"):
        prepare_sources(files, tiny_tokenizer, tmp_path / "notastore")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_num_proc_below_one_is_refused(tmp_path, tiny_tokenizer, bad):
    with pytest.raises(ValueError, match="`num_proc` must be an integer >= 1"):
        prepare_sources(_files(tmp_path), tiny_tokenizer, tmp_path / "s", num_proc=bad)
    with pytest.raises(ValueError, match="`data.num_proc` must be an integer"):
        CPTConfig.from_dict({"data": {"num_proc": bad}})


def test_an_interrupted_prepare_leaves_no_store(tmp_path, tiny_tokenizer, monkeypatch):
    files = _files(tmp_path)
    real = prepare_mod.tokenize_documents
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first source was written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "tokenize_documents", interrupted)
    final = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        prepare_sources(files, tiny_tokenizer, final)
    assert not final.exists() and not _staging_leftovers(final)
    # an interrupted rebuild keeps the old, complete store
    monkeypatch.setattr(prepare_mod, "tokenize_documents", real)
    prepare_sources(files, tiny_tokenizer, final)
    calls.clear()
    monkeypatch.setattr(prepare_mod, "tokenize_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_sources(files, make_tiny_tokenizer(vocab_size=300), final, overwrite=True)
    assert (final / MANIFEST).is_file() and not _staging_leftovers(final)


def test_two_processes_write_the_same_store_as_one(tmp_path, tiny_tokenizer):
    files = _files(tmp_path)
    one = prepare_sources(files, tiny_tokenizer, tmp_path / "one", num_proc=1)
    two = prepare_sources(files, tiny_tokenizer, tmp_path / "two", num_proc=2)
    cfg = dict(ratios={"domain": 0.5, "general": 0.5}, block_size=32, num_blocks=30, cache_schedule=False)
    a, b = PreparedMixer(one, **cfg), PreparedMixer(two, **cfg)
    assert [a[i]["input_ids"].tolist() for i in range(30)] == [b[i]["input_ids"].tolist() for i in range(30)]


def test_training_set_uses_a_matching_store_and_refuses_a_stale_one(tmp_path, tiny_tokenizer):
    files = _files(tmp_path)
    data = DataConfig(domain=SourceConfig(files["domain"]), general=SourceConfig(files["general"]), block_size=32,
                      replay_ratio=0.3, granularity="token", prepared_dir=str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="`data.prepared_dir`: .* does not exist; write it with `hf-cpt"):
        build_train_set(data, tiny_tokenizer, total_blocks=40)
    prepare_config(CPTConfig(data=data), tiny_tokenizer)
    mixer = build_train_set(data, tiny_tokenizer, total_blocks=40)
    assert isinstance(mixer, PreparedMixer)
    on_the_fly = build_train_set(dataclasses.replace(data, prepared_dir=None), tiny_tokenizer)
    want = [b["input_ids"] for b, _ in zip(on_the_fly, range(40))]
    assert [mixer[i]["input_ids"].tolist() for i in range(40)] == want
    with pytest.raises(ValueError, match="`data.prepared_dir`: the store at .* prepared with another tokenizer"):
        build_train_set(data, make_tiny_tokenizer(vocab_size=300), total_blocks=40)
    Path(files["domain"]).write_text(json.dumps({"text": "new text"}) + "\n")
    with pytest.raises(ValueError, match="other or changed files for source 'domain'; prepare it again"):
        build_train_set(data, tiny_tokenizer, total_blocks=40)


@pytest.mark.parametrize("field, value", [("replay_stages", [{"start": 0.5, "replay_ratio": 0.1}]),
                                          ("granularity", "token"), ("on_exhausted", "stop"),
                                          ("prepared_dir", "store")])
def test_masked_runs_refuse_mixing_settings_they_do_not_honour(field, value):
    with pytest.raises(ValueError, match=rf"^`data.{field}` .*masked runs \(`masking`\) .* do not support"):
        CPTConfig.from_dict({"objective": "mlm", "data": {field: value}})
    CPTConfig.from_dict({"data": {field: value}})  # causal runs honour them


def test_data_settings_at_scale_are_validated():
    with pytest.raises(ValueError, match=r"`data.num_workers` \(2\) needs `data.prepared_dir`"):
        CPTConfig.from_dict({"data": {"num_workers": 2}})
    with pytest.raises(ValueError, match="`data.num_workers` must be an integer >= 0"):
        CPTConfig.from_dict({"data": {"num_workers": -1}})
    with pytest.raises(ValueError, match="`data.domain.train`: a prepared store holds local files only"):
        CPTConfig.from_dict({"data": {"prepared_dir": "s", "domain": {"train": "x.jsonl", "streaming": True}}})
    CPTConfig.from_dict({"objective": "mlm", "data": {"num_workers": 2}})  # masked data is map-style


@pytest.mark.slow  # two training runs and dataloader workers
def test_cli_prepare_then_train_reads_the_store_with_workers_bitwise_like_on_the_fly(tmp_path, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir, max_steps=4, gradient_accumulation_steps=2)
    cfg["monitor"]["kl"] = False
    plain = CPTConfig.from_dict(cfg)
    cfg["data"].update(prepared_dir=str(tmp_path / "store"), num_workers=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, stderr = invoke_like_main(["train", str(path), "-o", str(tmp_path / "x")])  # the CLI, in-process
    assert code == 2 and stderr.strip().count("\n") == 0, stderr[-3000:]
    assert "`data.prepared_dir`" in stderr and "hf-cpt prepare CONFIG" in stderr
    assert not (tmp_path / "x").exists()
    code, stderr = invoke_like_main(["prepare", str(path), "--num-proc", "0"])
    assert code == 2 and stderr.strip().count("\n") == 0, stderr[-3000:]
    assert "`num_proc` must be an integer >= 1" in stderr
    code, stderr = invoke_like_main(["prepare", str(path), "--num-proc", "2"])
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "store" / MANIFEST).is_file()
    a = run_cpt(plain, tmp_path / "fly")
    b = run_cpt(CPTConfig.from_yaml(path), tmp_path / "prepared")
    assert a.metrics["train_tokens"] == b.metrics["train_tokens"]
    wa, wb = load_file(tmp_path / "fly" / "model.safetensors"), load_file(tmp_path / "prepared" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)



def test_resume_may_change_how_fast_data_is_made_but_not_which_data():
    a = CPTConfig.from_dict({"data": {"prepared_dir": "s"}})
    assert a.training_diff(a.override({"data.num_workers": 4, "data.num_proc": 8})) == []
    assert a.training_diff(a.override({"data.prepared_dir": None})) == ["`data.prepared_dir`: 's' -> None"]
