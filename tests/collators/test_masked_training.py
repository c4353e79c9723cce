"""Masked objectives end to end: `objective: mlm` + `masking: lem` from the CLI, and lexicon-weighted causal LM."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("spacy")

from hf_cpt.cli.main import app  # noqa: E402
from hf_cpt.config import CPTConfig  # noqa: E402
from hf_cpt.testing import read_embedded, train_wordpiece_tokenizer  # noqa: E402

from ..conftest import tiny_run_dict  # noqa: E402


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    tok = train_wordpiece_tokenizer(read_embedded("kjv", limit=40) + read_embedded("python-docs", limit=40), 1500)
    out = tmp_path_factory.mktemp("tiny-bert")
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_corpora(tmp_path_factory):
    """A few documents per corpus: spaCy tags ~10k words/s on CPU, so tests keep the text small."""
    root = tmp_path_factory.mktemp("corpora")
    files = {}
    for name, docs in (("domain", read_embedded("python-docs", limit=12)), ("general", read_embedded("kjv", limit=2)),
                       ("domain_eval", read_embedded("python-docs", "validation", limit=3)),
                       ("general_eval", read_embedded("kjv", "validation", limit=1))):
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"text": d[:6000]}) for d in docs))
        files[name] = str(path)
    return files


def _data(files) -> dict:
    return {"domain": {"train": files["domain"], "eval": files["domain_eval"]},
            "general": {"train": files["general"], "eval": files["general_eval"]}}


def _mlm_config(model_dir, masking, files) -> dict:
    d = tiny_run_dict(model_dir, max_steps=4)
    d["data"].update(_data(files))
    d["objective"] = "mlm"
    d["masking"] = masking
    d["data"]["block_size"] = 64
    d["data"]["max_eval_blocks"] = 8
    d["monitor"]["tolerance"] = 5.0
    return d


@pytest.mark.slow  # spaCy tagging and a CLI training run
def test_cli_trains_a_masked_lm_with_lem(tiny_bert_dir, small_corpora, tmp_path):
    cfg = tmp_path / "lem.yaml"
    cfg.write_text(yaml.safe_dump(_mlm_config(tiny_bert_dir, "lem", small_corpora)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(cfg), "-o", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    f = metrics["forgetting"]
    assert f["domain_loss_start"] > 0 and f["general_loss_end"] > 0
    tokens = metrics["train_tokens"]
    assert set(tokens) == {"domain", "general"} and min(tokens.values()) > 0  # 8 chunks: shares are noisy
    logged = [h for h in metrics["log_history"] if "masking/span_share" in h]
    assert logged and all(h["masking/span_share"] == 1.0 for h in logged)
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "masking: kind=lem" in card and "fill-mask" in card


@pytest.mark.slow  # two masked-LM training runs
def test_mlm_random_and_lexicon(tiny_bert_dir, small_corpora, tmp_path):
    from hf_cpt.recipe.train import run_cpt

    res = run_cpt(CPTConfig.from_dict(_mlm_config(tiny_bert_dir, "random", small_corpora)), output_dir=tmp_path / "random")
    assert res.metrics["global_step"] == 4
    lex = tmp_path / "lexicon.txt"
    lex.write_text("module\nfunction\nreturn value\nLord\n")
    res = run_cpt(CPTConfig.from_dict(_mlm_config(tiny_bert_dir, {"kind": "lexicon", "lexicon": str(lex)}, small_corpora)),
                  output_dir=tmp_path / "lexicon")
    shares = [h["masking/span_share"] for h in res.metrics["log_history"] if "masking/span_share" in h]
    assert shares and max(shares) > 0


@pytest.mark.slow  # spaCy tagging and a training run
def test_causal_lm_with_entity_weighting(tiny_model_dir, small_corpora, tmp_path):
    from hf_cpt.recipe.train import run_cpt

    d = tiny_run_dict(tiny_model_dir, max_steps=3)
    d["data"].update(_data(small_corpora))
    d["masking"] = {"kind": "lem", "span_weight": 3.0}
    d["monitor"]["tolerance"] = 5.0
    res = run_cpt(CPTConfig.from_dict(d), output_dir=tmp_path / "clm")
    logs = [h for h in res.metrics["log_history"] if "masking/span_token_share" in h]
    assert logs and 0 < logs[0]["masking/span_token_share"] < 1
    d["train"]["chunked_loss"] = False
    with pytest.raises(ValueError, match="`masking.span_weight`"):
        run_cpt(CPTConfig.from_dict(d), output_dir=tmp_path / "clm2")
    assert not (tmp_path / "clm2").exists()


def test_masking_config_errors(tiny_bert_dir, small_corpora):
    with pytest.raises(ValueError, match="`masking` random is a masked-LM objective"):
        CPTConfig.from_dict({"masking": "random"})
    d = _mlm_config(tiny_bert_dir, "lem", small_corpora)
    d["data"]["domain"]["streaming"] = True
    with pytest.raises(ValueError, match="map-style"):
        CPTConfig.from_dict(d)


def test_chunk_probabilities_give_the_token_share():
    from hf_cpt.recipe.masked_data import chunk_probabilities

    pd, pg = chunk_probabilities(0.25, domain_tokens=40, general_tokens=120)
    assert pd + pg == pytest.approx(1)
    assert pg * 120 / (pg * 120 + pd * 40) == pytest.approx(0.25)
    assert chunk_probabilities(0.25, 100, 100) == pytest.approx([0.75, 0.25])


def test_extend_vocab_on_an_encoder_config(tiny_bert_dir, small_corpora, tmp_path):
    from transformers import AutoModelForMaskedLM

    from hf_cpt.recipe import extend_checkpoint

    d = _mlm_config(tiny_bert_dir, "lem", small_corpora)
    d["vocab"] = {"n_new_tokens": 20}
    summary = extend_checkpoint(CPTConfig.from_dict(d), str(tmp_path / "ext"))
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "ext")
    assert model.get_output_embeddings().weight.shape[0] == summary["new_vocab_size"]
    # saved as the masked LM it was (a causal load would save a BertLMHeadModel with a fresh head)
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
