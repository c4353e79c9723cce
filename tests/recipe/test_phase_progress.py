"""One hf-cpt progress bar per phase before training (cleaning, tokenizing) with documents/s and tokens/s,
`datasets`' own bars silenced meanwhile (the user's setting restored), and nothing drawn when output is
redirected."""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import pytest

from hf_cpt.callbacks.progress import PhaseBar, datasets_bars_off
from hf_cpt.config import DataConfig, SourceConfig
from hf_cpt.data_clean import DedupConfig
from hf_cpt.recipe.data import build_eval_sets, build_train_set, load_split
from hf_cpt.recipe.prepare import prepare_sources
from hf_cpt.testing import read_embedded

pytest.importorskip("rensa")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bars(text: str) -> list[str]:
    """The final drawing of every bar in `text`: a bar redraws itself after `\\r` and ends with a newline."""
    return [seg.split("\r")[-1] for seg in text.split("\n") if seg.strip()]


@pytest.fixture
def stderr(monkeypatch):
    """Replace stderr: `stderr(tty=True)` is a terminal, `tty=False` a file (the CLI's `TQDM_DISABLE` unset)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def use(tty: bool) -> io.StringIO:
        out = _Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)
        return out

    return use


def _write(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture
def corpora(tmp_path):
    """Small domain/general/held-out files, already in `datasets`' cache (so loading draws nothing)."""
    docs = read_embedded("python-docs", limit=12)
    files = {"domain": _write(tmp_path / "d.jsonl", docs[:8] + [docs[0]]),
             "general": _write(tmp_path / "g.jsonl", read_embedded("kjv", limit=6)),
             "eval": _write(tmp_path / "e.jsonl", docs[8:12])}
    for path in files.values():
        load_split(path, SourceConfig(path), "warm the cache")
    return files


def _data(c) -> DataConfig:
    return DataConfig(domain=SourceConfig(c["domain"], c["eval"]), general=SourceConfig(c["general"], c["eval"]),
                      block_size=32, dedup=DedupConfig(near=False))


def test_a_run_shows_one_bar_for_cleaning_and_one_for_tokenizing(corpora, tiny_tokenizer, stderr):
    out = stderr(tty=True)
    data = _data(corpora)
    build_train_set(data, tiny_tokenizer)  # cleaning (the training text is tokenized on the fly)
    sets = build_eval_sets(data, tiny_tokenizer, {"general_self": _texts(read_embedded("kjv", "validation", limit=3))})
    assert set(sets) == {"general", "domain", "general_self"}
    cleaning, tokenizing = _bars(out.getvalue())  # no other bar: `datasets`' per-map bars are off
    assert cleaning.startswith("Cleaning training text: 100%") and "15/15" in cleaning and "doc/s" in cleaning
    assert tokenizing.startswith("Tokenizing held-out sets: 100%") and "11/11" in tokenizing  # all three sets
    assert "doc/s" in tokenizing and tokenizing.rstrip().endswith("tok/s]")
    assert "\x1b[" not in out.getvalue()  # one bar at a time: no cursor movement


def test_prepare_shows_one_bar_for_cleaning_and_one_for_tokenizing(corpora, tiny_tokenizer, stderr, tmp_path):
    out = stderr(tty=True)
    sources = {"domain": corpora["domain"], "general": corpora["general"]}
    prepare_sources(sources, tiny_tokenizer, tmp_path / "store", dedup=DedupConfig(near=False))
    cleaning, tokenizing = _bars(out.getvalue())
    assert cleaning.startswith("Cleaning training text: 100%")
    assert tokenizing.startswith("Tokenizing training sources: 100%") and "14/14" in tokenizing  # one copy gone
    assert tokenizing.rstrip().endswith("tok/s]")


@pytest.mark.parametrize("how", ["file", "TQDM_DISABLE"])
def test_nothing_is_drawn_when_output_is_redirected(corpora, tiny_tokenizer, stderr, monkeypatch, tmp_path, how):
    out = stderr(tty=how == "TQDM_DISABLE")  # `hf-cpt` sets TQDM_DISABLE when its output is not a terminal
    if how == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    data = _data(corpora)
    build_train_set(data, tiny_tokenizer)
    build_eval_sets(data, tiny_tokenizer)
    prepare_sources({"domain": corpora["domain"]}, tiny_tokenizer, tmp_path / "store", dedup=DedupConfig())
    assert out.getvalue() == ""


@pytest.fixture
def datasets_bars(monkeypatch):
    """`datasets`' progress-bar switch, as a user without `HF_DATASETS_DISABLE_PROGRESS_BARS` has it; its state is
    put back after the test."""
    import importlib

    module = importlib.import_module("datasets.utils.tqdm")
    monkeypatch.setattr(module, "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(module, "_hf_datasets_progress_bars_disabled", module.are_progress_bars_disabled())
    return module


@pytest.mark.parametrize("user_disabled", [False, True])
def test_the_users_datasets_bar_setting_is_restored(corpora, tiny_tokenizer, monkeypatch, tmp_path, datasets_bars,
                                                    user_disabled):
    are_progress_bars_disabled = datasets_bars.are_progress_bars_disabled
    seen = []
    update = PhaseBar.update
    monkeypatch.setattr(PhaseBar, "update", lambda self, *a, **k: (seen.append(are_progress_bars_disabled()),
                                                                  update(self, *a, **k)))
    (datasets_bars.disable_progress_bars if user_disabled else datasets_bars.enable_progress_bars)()
    build_eval_sets(_data(corpora), tiny_tokenizer)
    assert seen and all(seen)  # off while the phase bar counts
    assert are_progress_bars_disabled() is user_disabled
    tiny = _write(tmp_path / "tiny.jsonl", ["too short for a block"])
    short = DataConfig(domain=SourceConfig(corpora["domain"], tiny), general=None, replay_ratio=0.0, block_size=64)
    with pytest.raises(ValueError, match="shorter than one block"):  # restored on an error too
        build_eval_sets(short, tiny_tokenizer)
    assert are_progress_bars_disabled() is user_disabled


def test_a_bar_pickles_inert_and_to_the_same_bytes_so_map_caching_holds():
    from datasets.fingerprint import Hasher

    one, two = PhaseBar("x", progress=False), PhaseBar("x", progress=False)
    two.documents, two.tokens = 5, 50
    assert Hasher.hash(one) == Hasher.hash(two)  # a `datasets.map` function holding the bar keeps its fingerprint
    worker = pickle.loads(pickle.dumps(two))  # in a worker process (`num_proc`): draws nothing
    worker.update(3, 30)
    assert worker.disabled


def test_datasets_bars_off_leaves_a_forced_setting_alone(monkeypatch, datasets_bars):
    monkeypatch.setattr(datasets_bars, "HF_DATASETS_DISABLE_PROGRESS_BARS", False)  # the user set it to 0
    datasets_bars.enable_progress_bars()
    with datasets_bars_off():
        assert not datasets_bars.are_progress_bars_disabled()


def _texts(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


def test_a_masked_run_tokenizes_under_one_bar(corpora, tiny_model_dir, tiny_tokenizer, stderr, tmp_path):
    from hf_cpt.config import CPTConfig
    from hf_cpt.recipe.masked_data import build_masked_data
    from tests.conftest import tiny_run_dict

    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("function\nmodule\n", encoding="utf-8")
    run = tiny_run_dict(tiny_model_dir, max_steps=2)
    run["data"].update(domain={"train": corpora["domain"], "eval": corpora["eval"]},
                       general={"train": corpora["general"], "eval": corpora["eval"]}, block_size=32)
    run["masking"] = {"kind": "lexicon", "lexicon": str(lexicon)}
    out = stderr(tty=True)
    build_masked_data(CPTConfig.from_dict(run), tiny_tokenizer)
    cleaning, tokenizing = _bars(out.getvalue())  # chunking, tagging, tokenizing: one bar, none per `datasets` map
    assert cleaning.startswith("Cleaning training text: 100%") and "15/15" in cleaning  # `data.dedup` by default
    assert tokenizing.startswith("Tokenizing training text and held-out sets: 100%") and "22/22" in tokenizing
    assert tokenizing.rstrip().endswith("tok/s]")
