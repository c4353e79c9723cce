import json
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig

from ..conftest import tiny_run_dict

runner = CliRunner()


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_templates_lists_every_template():
    result = runner.invoke(app, ["templates"])
    assert result.exit_code == 0
    for name in ("quickstart", "medical", "legal", "finance", "code", "new-language"):
        assert name in result.output


def test_init_writes_an_editable_template_that_parses(tmp_path):
    out = tmp_path / "med.yaml"
    result = runner.invoke(app, ["init", "--domain", "medical", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert CPTConfig.from_yaml(out).model.dtype == "bfloat16"
    again = runner.invoke(app, ["init", "--domain", "medical", "--output", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    unknown = runner.invoke(app, ["init", "--domain", "astrology", "--output", str(tmp_path / "x.yaml")])
    assert unknown.exit_code == 2 and "`--domain` 'astrology' is not a preset (code, " in unknown.output
    typo = runner.invoke(app, ["init", "--domain", "medial", "--output", str(tmp_path / "x.yaml")])
    assert typo.exit_code == 2 and "(did you mean 'medical'?)" in typo.output


def test_init_without_a_domain_lists_the_presets_and_the_custom_form():
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert "medical" in result.output and "quickstart" in result.output
    assert "hf-cpt init --domain NAME --train PATH --eval PATH" in result.output


@pytest.mark.parametrize("args, message", [
    (["--domain", "chemistry"], "`--domain` 'chemistry' is not a preset"),
    (["--domain", "chemistry", "--train", "embedded:python-docs/train"], "`--eval` is needed with --train"),
    (["--domain", "chemistry", "--train", "nope/*.jsonl", "--eval", "embedded:kjv/validation"],
     "`--train` 'nope/*.jsonl' matches no file or directory"),
    (["--train", "embedded:python-docs/train"], "`--domain` is required with --train/--eval"),
    (["--domain", "chem: organic", "--train", "embedded:python-docs/train", "--eval", "embedded:kjv/validation"],
     "`--domain` 'chem: organic': use letters"),
])
def test_init_for_a_custom_domain_refuses_with_the_fix(tmp_path, args, message):
    result = runner.invoke(app, ["init", *args, "--output", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x.yaml").exists()


def test_init_for_any_domain_writes_a_config_that_trains(tmp_path, tiny_model_dir):
    """`hf-cpt init --domain NAME --train --eval` fills the domain into the generic template (the forgetting
    study's recipe: self-synthesised replay with distillation, a guard on `general_self`); it trains as written,
    shrunk only in size."""
    (tmp_path / "chem").mkdir()
    from hf_cpt.testing import read_embedded

    docs = read_embedded("python-docs", limit=12)  # distinct documents: data cleaning keeps them all
    (tmp_path / "chem" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    (tmp_path / "chem" / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    out = tmp_path / "chem.yaml"
    result = runner.invoke(app, ["init", "--domain", "organic chemistry", "--train", str(tmp_path / "chem/*.jsonl"),
                                 "--eval", str(tmp_path / "chem" / "val.jsonl"), "--model", str(tiny_model_dir),
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# hf-cpt config for the domain `organic chemistry`") and "$" not in text
    cfg = CPTConfig.from_yaml(out)
    assert cfg.domain == "organic chemistry" and cfg.model.name_or_path == str(tiny_model_dir)
    assert cfg.data.domain.eval == str(tmp_path / "chem" / "val.jsonl") and cfg.monitor.general == "general_self"
    assert cfg.train.distill is not None and cfg.data.general.train == "self" and cfg.output_dir == "runs/organic-chemistry"
    from hf_cpt.recipe import run_cpt

    small = cfg.override({"train.max_steps": 2, "train.eval_steps": 1, "train.save_steps": 0,
                          "data.block_size": 32, "data.max_eval_blocks": 2, "data.synth.train_tokens": 256,
                          "data.synth.eval_tokens": 128, "data.synth.max_new_tokens": 32,
                          "schedule.warmup_steps": 1})
    result = run_cpt(small, output_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result.metrics["global_step"] == metrics["global_step"] == 2 and metrics["distilled_tokens"] > 0
    assert [h["step"] for h in metrics["eval_history"]][0] == 0 and "general_self_kl" in metrics["eval_history"][-1]


@pytest.mark.slow  # three CLI training runs (~16 s under load)
def test_train_runs_end_to_end_and_writes_every_output(tmp_path, tiny_model_dir):
    config = _write(tmp_path, tiny_run_dict(tiny_model_dir))
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(config), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "domain        held-out loss" in result.output and "general       held-out loss" in result.output
    assert "KL to base" in result.output  # the general set: KL to the base model and top-1 agreement
    assert "  guard: held-out loss on `general` <= " in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    # it ends in one sentence: domain gain, KL on the guarded set, guard status, where the files are
    assert result.output.rstrip().splitlines()[-1] == metrics["summary"]
    assert metrics["summary"].startswith("Domain loss ") and "on `general` (bound " in metrics["summary"]
    assert f"KL to the base {metrics['forgetting']['general_kl_end']:.3f} on `general`" in metrics["summary"]
    assert metrics["summary"].endswith(f"in {out.resolve()}.")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "hf_cpt_config.yaml", "metrics.json",
                 "forgetting.png", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists() and not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["eval_history"]] == [0, 2, 4]
    assert metrics["train_tokens"] == {"domain": 6 * 32, "general": 2 * 32}
    assert metrics["forgetting"]["domain_loss_end"] < metrics["forgetting"]["domain_loss_start"]
    card = (out / "README.md").read_text()
    assert "hf-cpt" in card and "| general (upstream) |" in card
    # the written config reproduces the run's config
    assert CPTConfig.from_yaml(out / "hf_cpt_config.yaml") == CPTConfig.from_yaml(config)
    # the result reloads with stock transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)

    # a second run into the same non-empty directory is refused, then allowed with --overwrite
    again = runner.invoke(app, ["train", str(config), "--output-dir", str(out), "--max-steps", "2"])
    assert again.exit_code == 2 and "exists and is not empty" in again.output and "--overwrite" in again.output
    again = runner.invoke(app, ["train", str(config), "--output-dir", str(out), "--max-steps", "2", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"domain": {"train": "/nonexistent/d.jsonl", "eval": "embedded:python-docs/validation"}}},
         "`data.domain.train`: no data file found"),
        ({"data": {"domain": {"train": "embedded:python-docs/train"}}}, "`data.domain.eval` is not set"),
        ({"data": {"replay_ratio": 1.5}}, "`data.replay_ratio` must be in [0, 1]"),
        ({"model": {"name_or_path": "./no/such/model"}}, "`model.name_or_path`"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(tmp_path, tiny_model_dir, change, message):
    data = tiny_run_dict(tiny_model_dir)
    for section, values in change.items():
        for k, v in values.items():
            if isinstance(v, dict):
                data[section].setdefault(k, {}).update(v)
            else:
                data[section][k] = v
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(_write(tmp_path, data)), "-o", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())  # no half-written leftovers


def test_unknown_template_and_missing_arguments():
    result = runner.invoke(app, ["train", "--template", "quickstrt"])
    assert result.exit_code == 2 and "did you mean 'quickstart'" in result.output
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--template NAME" in result.output


@pytest.mark.slow  # a 6-step training run with evaluations (~13 s under load)
def test_train_with_a_rewarming_schedule_block(tmp_path, tiny_model_dir):
    from hf_cpt.callbacks.rewarm import RewarmConfig, lr_multiplier

    data = tiny_run_dict(tiny_model_dir, max_steps=6, learning_rate=1e-3)
    data["train"].pop("lr_scheduler_type")  # the `schedule` block defines the LR
    data["schedule"] = {"schedule": "cycles", "embedding_lr_ratio": 2.0, "cycles": [
        {"steps": 3, "warmup_steps": 1, "floor": 0.1}, {"steps": 3, "peak": 0.5, "warmup_steps": 1}]}
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(_write(tmp_path, data)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    logged = [(h["step"], h["learning_rate"]) for h in json.loads((out / "metrics.json").read_text())["log_history"]
              if "learning_rate" in h]
    sched = CPTConfig.from_dict(data).schedule
    assert isinstance(sched, RewarmConfig)
    assert [lr for _, lr in logged] == pytest.approx([1e-3 * lr_multiplier(s - 1, sched, 6) for s, _ in logged])
    assert "schedule:" in (out / "hf_cpt_config.yaml").read_text()


@pytest.mark.slow  # a training run with evaluations (~9 s under load)
def test_train_with_active_forgetting_and_embedding_only_relearning(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = tiny_run_dict(tiny_model_dir, max_steps=4, trainable="embeddings")
    data["active_forgetting"] = {"every_k_updates": 4}
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(_write(tmp_path, data)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    # body frozen; the embeddings were trained, then reset at update 4
    assert all(torch.equal(before[k], after[k]) for k in before if "embed" not in k)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])



@pytest.mark.slow  # learns subwords and OFA vectors (~50 s under load)
def test_extend_vocab_writes_a_stock_checkpoint(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_run_dict(tiny_model_dir)
    d["vocab"] = {"n_new_tokens": 30, "init": "subword_mean"}
    cfg = _write(tmp_path, d)
    out = tmp_path / "extended"
    result = runner.invoke(app, ["extend-vocab", str(cfg), "-o", str(out), "--init", "ofa"])
    assert result.exit_code == 0, result.output
    assert "+30 tokens (BPE)" in result.output and "fertility" in result.output and "init ofa" in result.output
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = base.get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == n + 30
    assert torch.equal(model.get_input_embeddings().weight[:n], base.get_input_embeddings().weight)
    assert json.loads((out / "hf_cpt_vocab.json").read_text())["init"] == "ofa"
    again = runner.invoke(app, ["extend-vocab", str(cfg), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output or "overwrite" in again.output


def test_extend_vocab_needs_a_vocab_block(tmp_path, tiny_model_dir):
    cfg = _write(tmp_path, tiny_run_dict(tiny_model_dir))
    result = runner.invoke(app, ["extend-vocab", str(cfg), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no `vocab:` block" in result.output
    assert not (tmp_path / "x").exists()


def test_progress_bars_are_off_when_output_is_redirected(monkeypatch):
    """Redirected to a file, the log gets lines, not tqdm's carriage returns and cursor-up codes; a terminal keeps
    its bars, and a TQDM_DISABLE the user set is left alone."""
    import io

    from hf_cpt.cli.main import _plain_output_when_redirected

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not _plain_output_when_redirected(Terminal()) and "TQDM_DISABLE" not in os.environ
    assert _plain_output_when_redirected(io.StringIO()) and os.environ["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not _plain_output_when_redirected(io.StringIO()) and os.environ["TQDM_DISABLE"] == "0"
