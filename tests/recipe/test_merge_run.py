"""`merge_with_base` (the API behind `hf-cpt merge`) on run directories built from the tiny model: full, LoRA and
vocabulary-extended runs, single alpha and sweeps, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.merge import CheckpointReader
from hf_cpt.recipe.merge_run import MERGE_RECORD, SWEEP_FILE, SWEEP_PLOT, merge_with_base
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer
from tests.conftest import tiny_run_dict


def _weights(directory) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(directory)
    return {k: reader.get(k) for k in reader.keys()}


def _fake_run(tmp_path, base_dir, tokenizer, *, extend: int = 0, name: str = "run", **config):
    """What `hf-cpt train` leaves: the adapted weights, tokenizer, recipe and a model card."""
    model = make_tiny_llama(len(tokenizer) - extend)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    run = tmp_path / name
    if extend:
        model.resize_token_embeddings(len(tokenizer))
        (run).mkdir()
        (run / "hf_cpt_vocab.json").write_text(json.dumps({"old_vocab_size": len(tokenizer) - extend}))
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    CPTConfig.from_dict({**tiny_run_dict(base_dir), **config}).save_pretrained(run)
    (run / "README.md").write_text("---\nlibrary_name: transformers\n---\n# A run\n")
    return run


@pytest.fixture
def full_run(tmp_path, tiny_model_dir, tiny_tokenizer):
    return _fake_run(tmp_path, tiny_model_dir, tiny_tokenizer)


def test_single_alpha_ends_are_the_base_and_the_adapted_model(tmp_path, full_run, tiny_model_dir):
    base, adapted = _weights(tiny_model_dir), _weights(full_run)
    zero = merge_with_base(full_run, 0.0, tmp_path / "zero")  # base read from the run's hf_cpt_config.yaml
    one = merge_with_base(full_run, 1.0, tmp_path / "one", base=str(tiny_model_dir))
    assert all(torch.equal(v, base[k]) for k, v in _weights(zero.output_dir).items())
    assert all(torch.equal(v, adapted[k]) for k, v in _weights(one.output_dir).items())
    out = tmp_path / "zero"
    for name in ("config.json", "tokenizer.json", "hf_cpt_config.yaml", MERGE_RECORD, "README.md"):
        assert (out / name).is_file(), name
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["alpha"] == 0.0 and record["kind"] == "full" and record["base"] == str(tiny_model_dir)
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "## Merged with the base" in card and "alpha = 0**" in card
    assert not (tmp_path / "run" / MERGE_RECORD).exists()  # the run itself is untouched
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "one")  # a normal checkpoint


def test_sweep_evaluates_every_alpha_and_picks_one(tmp_path, full_run, tiny_model_dir):
    result = merge_with_base(full_run, [0.0, 0.5, 1.0], tmp_path / "sweep", pick="kl<=1000")
    rows = result.sweep
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[0]["general_top1_agree"] == 1.0
    assert rows[0]["kl"] < rows[1]["kl"] < rows[2]["kl"]
    assert {"domain_loss", "general_loss", "general_kl"} <= set(rows[0])
    best = min(range(3), key=lambda i: rows[i]["domain_loss"])
    assert result.picked == best and result.alpha == rows[best]["alpha"]
    out = result.output_dir
    saved = json.loads((out / SWEEP_FILE).read_text())
    assert saved["picked"] == best and len(saved["rows"]) == 3
    assert (out / SWEEP_PLOT).stat().st_size > 1000
    assert not list(out.glob(".sweep*")) and not list(out.glob("alpha-*"))
    assert "| 0.5 |" in (out / "README.md").read_text()
    # the written model is the picked alpha's merge
    again = merge_with_base(full_run, rows[best]["alpha"], tmp_path / "again")
    assert all(torch.equal(v, _weights(again.output_dir)[k]) for k, v in _weights(out).items())
    knee = merge_with_base(full_run, [0.0, 0.5, 1.0], tmp_path / "knee")
    assert knee.record["sweep"]["pick"] == "knee" and "<- picked" in knee.table()
    with pytest.raises(ValueError, match="no alpha keeps the KL"):
        merge_with_base(full_run, [0.5, 1.0], tmp_path / "none", pick="kl<=0")
    assert not (tmp_path / "none").exists()


def test_vocabulary_extended_run(tmp_path, tiny_model_dir):
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["zzqx", "qqzx", "xxqz", "zqzq"])
    run = _fake_run(tmp_path, tiny_model_dir, tokenizer, extend=4)
    base, adapted = _weights(tiny_model_dir), _weights(run)
    result = merge_with_base(run, [0.0, 1.0], tmp_path / "out", pick="alpha=0")
    merged = _weights(result.output_dir)
    emb = "model.embed_tokens.weight"
    assert merged[emb].shape[0] == base[emb].shape[0] + 4
    assert torch.equal(merged[emb][:-4], base[emb]) and torch.equal(merged[emb][-4:], adapted[emb][-4:])
    assert result.record["extended_rows"] == {emb: [base[emb].shape[0], base[emb].shape[0] + 4]}
    assert result.sweep[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert "Rows of new tokens" in (result.output_dir / "README.md").read_text()
    one = merge_with_base(run, 1.0, tmp_path / "one")
    assert all(torch.equal(v, adapted[k]) for k, v in _weights(one.output_dir).items())
    assert one.record["new_rows_from"] == len(tokenizer) - 4


def test_lora_adapter_is_merged_like_peft(tmp_path, tiny_model_dir, tiny_tokenizer):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path = tiny_model_dir
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")
    want = lora.merge_and_unload().state_dict()
    result = merge_with_base(tmp_path / "adapter", 1.0, tmp_path / "merged")
    assert result.record["kind"] == "lora" and result.record["lora_modules"] == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for k, v in loaded.items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-6, msg=k)
    with pytest.raises(ValueError, match="no hf_cpt_config.yaml"):
        merge_with_base(tmp_path / "adapter", [0.0, 1.0], tmp_path / "sweep")
    cfg = CPTConfig.from_dict(tiny_run_dict(tiny_model_dir))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(cfg.to_yaml())
    swept = merge_with_base(tmp_path / "adapter", [0.0, 1.0], tmp_path / "sweep", config=cfg_path, pick="alpha=1")
    assert swept.sweep[0]["kl"] == pytest.approx(0.0, abs=1e-5) and swept.sweep[1]["kl"] > 0


def test_refusals(tmp_path, full_run):
    with pytest.raises(ValueError, match="`pick` chooses among several"):
        merge_with_base(full_run, 0.5, tmp_path / "o", pick="knee")
    with pytest.raises(ValueError, match="`pick` must be"):
        merge_with_base(full_run, [0.0, 1.0], tmp_path / "o", pick="best")
    with pytest.raises(ValueError, match="twice"):
        merge_with_base(full_run, [0.5, 0.5], tmp_path / "o")
    with pytest.raises(ValueError, match="run directory itself"):
        merge_with_base(full_run, 0.5, full_run)
    (tmp_path / "bare").mkdir()
    make_tiny_llama(384).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="records no base model"):
        merge_with_base(tmp_path / "bare", 0.5, tmp_path / "o")
    merge_with_base(full_run, 0.5, tmp_path / "o")
    with pytest.raises(FileExistsError):
        merge_with_base(full_run, 0.5, tmp_path / "o")
    merge_with_base(full_run, 0.25, tmp_path / "o", overwrite=True)
    assert json.loads((tmp_path / "o" / MERGE_RECORD).read_text())["alpha"] == 0.25


def test_cli_single_alpha_sweep_and_one_line_errors(tmp_path, full_run):
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(full_run), "--alpha", "0.5", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "Merged model (alpha 0.5" in res.output and (tmp_path / "m" / "model.safetensors").is_file()
    res = runner.invoke(app, ["merge", str(full_run), "--alpha", "0,1", "-o", str(tmp_path / "s"),
                              "--pick", "alpha=1"])
    assert res.exit_code == 0, res.output
    assert "domain loss" in res.output and "<- picked" in res.output and "picked alpha 1" in res.output
    res = runner.invoke(app, ["merge", str(full_run), "--alpha", "0,x", "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "`--alpha`" in res.output


@pytest.mark.slow
def test_sweep_on_a_trained_run_reproduces_its_final_numbers(tmp_path, tiny_model_dir):
    """alpha 1 of the sweep is the adapted model: its domain loss and KL are the ones training measured last."""
    runner = CliRunner()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CPTConfig.from_dict(tiny_run_dict(tiny_model_dir, max_steps=6, eval_steps=3)).to_yaml())
    res = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    f = json.loads((tmp_path / "run" / "metrics.json").read_text())["forgetting"]
    res = runner.invoke(app, ["merge", str(tmp_path / "run"), "--alpha", "0,0.5,1", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "m" / SWEEP_FILE).read_text())["rows"]
    assert rows[2]["domain_loss"] == pytest.approx(f["domain_loss_end"], abs=1e-4)
    assert rows[2]["general_loss"] == pytest.approx(f["general_loss_end"], abs=1e-4)
    assert rows[2]["general_kl"] == pytest.approx(f["general_kl_end"], abs=1e-4)
    assert rows[0]["domain_loss"] == pytest.approx(f["domain_loss_start"], abs=1e-4)


def test_sweep_scores_the_runs_downstream_tasks(tmp_path, tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("lm_eval")
    run = _fake_run(tmp_path, tiny_model_dir, tiny_tokenizer,
                    downstream={"tasks": ["hf_cpt_kjv_mc"], "limit": 4, "batch_size": 4})
    result = merge_with_base(run, [0.0, 1.0], tmp_path / "out", pick="alpha=1")
    assert all(0.0 <= r["hf_cpt_kjv_mc/acc"] <= 1.0 for r in result.sweep)
    assert "hf_cpt_kjv_mc/acc" in result.table() and "stderr" not in result.table()
