"""Data cleaning in the recipe (issue 34): the on-the-fly mixer, masked runs, the prepared store (manifest,
fingerprint, dry run), lm-eval task documents as held-out sets, metrics and the model card."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hf_cpt.config import CPTConfig, DataConfig, SourceConfig
from hf_cpt.data_clean import DedupConfig, DecontaminateConfig
from hf_cpt.data_clean.planted import random_documents
from hf_cpt.mixers.prepared import MANIFEST
from hf_cpt.model_card import recipe_lines
from hf_cpt.recipe.cleaning import downstream_texts, format_report
from hf_cpt.recipe.data import build_train_set
from hf_cpt.recipe.prepare import prepare_config

pytest.importorskip("rensa")


def _write(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture
def corpora(tmp_path):
    """Domain with an exact copy, a near copy and a document quoting the held-out split; general repeating a
    domain document."""
    docs = random_documents(13, seed=11)
    held = random_documents(2, seed=12)
    quote = " ".join(held[0].split()[10:30])
    domain = docs[:6] + [docs[0].upper(), docs[1] + " extra words here", docs[12] + " " + quote]
    general = docs[6:12] + [docs[3]]
    return {"domain": _write(tmp_path / "d.jsonl", domain), "general": _write(tmp_path / "g.jsonl", general),
            "eval": _write(tmp_path / "e.jsonl", held), "n_domain": len(domain), "n_general": len(general)}


def _data(c, **kw) -> DataConfig:
    return DataConfig(domain=SourceConfig(c["domain"], c["eval"]), general=SourceConfig(c["general"], c["eval"]),
                      block_size=32, **kw)


def test_on_the_fly_mixer_reads_the_cleaned_documents(corpora, tiny_tokenizer):
    mixer = build_train_set(_data(corpora), tiny_tokenizer)
    assert len(mixer.readers["domain"].data) == corpora["n_domain"] - 3
    assert len(mixer.readers["general"].data) == corpora["n_general"] - 1
    s = mixer.cleaning["sources"]
    assert (s["domain"]["exact"]["documents"], s["domain"]["near"]["documents"],
            s["domain"]["contaminated"]["documents"]) == (1, 1, 1)
    assert s["domain"]["contaminated"]["by_set"] == {"domain": 1}
    assert s["general"]["exact"]["across_sources"] == 1
    assert s["domain"]["exact"]["tokens"] > 0 and s["domain"]["tokens_estimated"]
    off = build_train_set(_data(corpora, dedup=None, decontaminate=DecontaminateConfig(action="off")), tiny_tokenizer)
    assert off.cleaning is None and len(off.readers["domain"].data) == corpora["n_domain"]
    report = build_train_set(_data(corpora, decontaminate=DecontaminateConfig(action="report")), tiny_tokenizer)
    assert len(report.readers["domain"].data) == corpora["n_domain"] - 2  # the contaminated one stays


def test_cleaning_every_document_away_is_refused(tmp_path, tiny_tokenizer):
    held = random_documents(1, seed=3)
    path = _write(tmp_path / "x.jsonl", [held[0]])
    data = DataConfig(domain=SourceConfig(path, path), general=None, replay_ratio=0.0, block_size=32)
    with pytest.raises(ValueError, match=r"^`data.domain.train`: cleaning removed every document"):
        build_train_set(data, tiny_tokenizer)


def test_prepared_store_is_cleaned_like_the_on_the_fly_path(corpora, tmp_path, tiny_tokenizer):
    data = _data(corpora, prepared_dir=str(tmp_path / "store"), replay_ratio=0.3)
    report = prepare_config(CPTConfig(data=data), tiny_tokenizer, dry_run=True)
    assert not (tmp_path / "store").exists()  # a dry run writes nothing
    assert "exact 1 docs" in format_report(report)
    prepare_config(CPTConfig(data=data), tiny_tokenizer, workers=2)
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["sources"]["domain"]["documents"] == corpora["n_domain"] - 3
    cleaning = manifest["cleaning"]["sources"]["domain"]
    assert cleaning["tokens_estimated"] is False and cleaning["kept"]["tokens"] == manifest["sources"]["domain"]["tokens"]
    assert {k: cleaning[k]["documents"] for k in ("exact", "near", "contaminated")} == \
        {k: report["sources"]["domain"][k]["documents"] for k in ("exact", "near", "contaminated")}
    mixer = build_train_set(data, tiny_tokenizer, total_blocks=30)
    assert mixer.cleaning["sources"]["domain"]["exact"]["documents"] == 1
    fly = build_train_set(dataclasses.replace(data, prepared_dir=None), tiny_tokenizer)
    assert [mixer[i]["input_ids"].tolist() for i in range(30)] == [b["input_ids"] for b, _ in zip(fly, range(30))]
    with pytest.raises(ValueError, match="prepared with other cleaning settings or held-out sets"):
        build_train_set(dataclasses.replace(data, dedup=DedupConfig(threshold=0.9)), tiny_tokenizer, total_blocks=30)


def test_streaming_sources_are_cleaned_identically_every_pass(corpora, tiny_tokenizer):
    data = _data(corpora)
    streamed = dataclasses.replace(data, general=dataclasses.replace(data.general, streaming=True))
    mixer = build_train_set(streamed, tiny_tokenizer)
    stream = mixer.readers["general"].data
    first, second = [d["text"] for d in stream], [d["text"] for d in stream]
    assert first == second and len(first) == corpora["n_general"] - 1
    assert stream.report["sources"]["general"]["exact"]["across_sources"] == 1


def test_offline_lm_eval_tasks_are_held_out_sets():
    pytest.importorskip("lm_eval")
    from hf_cpt.callbacks.downstream import DownstreamConfig

    texts = downstream_texts(DownstreamConfig(tasks=["hf_cpt_kjv_mc", "hf_cpt_python_docs_mc"]))
    assert set(texts) == {"downstream:hf_cpt_kjv_mc", "downstream:hf_cpt_python_docs_mc"}
    first = json.loads(Path("hf_cpt/data/tasks/hf_cpt_kjv_mc.jsonl").read_text().splitlines()[0])
    assert texts["downstream:hf_cpt_kjv_mc"][0].startswith(first["context"])
    assert first["choices"][0] in texts["downstream:hf_cpt_kjv_mc"][0]


def test_model_card_states_what_cleaning_removed(corpora, tiny_tokenizer):
    mixer = build_train_set(_data(corpora), tiny_tokenizer)
    lines = recipe_lines(CPTConfig().to_dict(), {"cleaning": mixer.cleaning})
    line = next(x for x in lines if x.startswith("data cleaning"))
    assert "near dedup (MinHash/LSH, Jaccard >= 0.8" in line and "domain: exact 1 docs" in line
    off = CPTConfig.from_dict({"data": {"dedup": None, "decontaminate": {"action": "off"}}}).to_dict()
    assert "data cleaning: off (no dedup, no decontamination)" in recipe_lines(off, {})


def test_a_run_reports_cleaning_in_metrics_log_and_card(tmp_path, tiny_model_dir, caplog):
    import logging

    from hf_cpt.recipe import run_cpt

    from ..conftest import tiny_run_dict

    cfg = tiny_run_dict(tiny_model_dir, max_steps=2)
    cfg["monitor"]["kl"] = False
    with caplog.at_level(logging.INFO, logger="hf_cpt"):
        result = run_cpt(CPTConfig.from_dict(cfg), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["cleaning"]["sources"]) == {"domain", "general"}
    assert metrics["cleaning"] == result.metrics["cleaning"]
    assert set(metrics["cleaning"]["held_out"]) == {"domain", "general"}
    assert any(r.getMessage().startswith("data cleaning: domain: 64 docs") for r in caplog.records)
    assert "data cleaning (first copy kept)" in (tmp_path / "run" / "README.md").read_text()


def test_cli_prepare_dry_run_prints_the_report_and_writes_nothing(corpora, tmp_path, tiny_model_dir):
    import yaml
    from typer.testing import CliRunner

    from hf_cpt.cli.main import app

    from ..conftest import tiny_run_dict

    cfg = tiny_run_dict(tiny_model_dir)
    cfg["data"].update(domain={"train": corpora["domain"], "eval": corpora["eval"]},
                       general={"train": corpora["general"], "eval": corpora["eval"]},
                       prepared_dir=str(tmp_path / "store"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["prepare", str(path), "--dry-run", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "data cleaning: domain: 9 docs" in result.output and "exact        " in result.output
    assert not (tmp_path / "store").exists()
    result = CliRunner().invoke(app, ["prepare", str(path), "--workers", "0"])
    assert result.exit_code != 0 and "`workers` must be an integer >= 1" in result.output
