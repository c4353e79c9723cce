"""The run recipe end to end on a tiny model: self-synthesised held-out text, KL to the base, distillation replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_cpt.config import CPTConfig
from hf_cpt.recipe import run_cpt

from ..conftest import tiny_run_dict

pytestmark = pytest.mark.timeout(900)


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                HF_CPT_CACHE=str(cache))


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", *args], env=env, capture_output=True, text=True)


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"
    return proc


def _synth_cfg(model_dir: Path, **train) -> dict:
    cfg = tiny_run_dict(model_dir, **train)
    cfg["data"]["synth"] = {"eval_tokens": 96, "max_new_tokens": 24, "batch_size": 8, "train_tokens": 200}
    cfg["data"]["general"] = {"train": "self", "eval": "embedded:kjv/validation"}
    cfg["monitor"]["kl_top_k"] = 16
    return cfg


@pytest.mark.slow  # a training run with self-synthesis
def test_self_synthesised_held_out_set_and_kl_reach_metrics_card_and_plot(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path / "cache"))
    cfg = CPTConfig.from_dict(_synth_cfg(tiny_model_dir, max_steps=4, eval_steps=2))
    result = run_cpt(cfg, output_dir=tmp_path / "out")
    history = result.metrics["eval_history"]
    assert [r["step"] for r in history] == [0, 2, 4]
    for name in ("general", "general_self"):
        assert all(f"{name}_loss" in r and f"{name}_kl" in r and f"{name}_top1_agree" in r for r in history)
        assert abs(history[0][f"{name}_kl"]) < 1e-5 and history[0][f"{name}_top1_agree"] == 1.0  # the base itself
        assert history[-1][f"{name}_kl"] > 1e-7  # lr 1e-3 on a tiny model moves it
    assert "domain_kl" not in history[0]  # KL is measured on general sets only
    f = result.metrics["forgetting"]
    assert f["general_self_kl_end"] == history[-1]["general_self_kl"]
    assert f["general_self_loss_start"] == history[0]["general_self_loss"]
    # the Trainer's own log history carries them too (so trainer_state.json and integrations see them)
    logged = [r for r in result.metrics["log_history"] if "eval_general_self_kl" in r]
    assert len(logged) == 3
    assert result.metrics["train_tokens"]["general"] > 0  # the replay source is the synthesised text
    card = (result.output_dir / "README.md").read_text()
    assert "general_self" in card and "KL to base" in card
    assert (result.output_dir / "forgetting.png").stat().st_size > 10_000
    # the cache holds both synthesised sets; a second run generates nothing
    assert len(list((tmp_path / "cache" / "synth").glob("*.jsonl.gz"))) == 2
    import hf_cpt.synth as synth

    calls = []
    monkeypatch.setattr(synth, "synthesize_text", lambda *a, **k: calls.append(1))
    run_cpt(cfg.override({"train.max_steps": 2}), output_dir=tmp_path / "again")
    assert calls == []


@pytest.mark.slow  # a training run with self-synthesis
def test_kl_guard_stops_on_kl(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path / "cache"))
    d = tiny_run_dict(tiny_model_dir, max_steps=6, eval_steps=2, learning_rate=5e-3)
    # two guards on one set: the KL one stops at its first breach, the loss one (a loose bound) holds
    d["monitor"] = {"action": "warn", "kl_top_k": 8, "guards": [
        {"set": "general", "metric": "kl", "tolerance": 1e-6, "action": "stop"},
        {"set": "general", "metric": "loss", "tolerance": 100.0, "mode": "absolute"}]}
    result = run_cpt(CPTConfig.from_dict(d), output_dir=tmp_path / "out")
    f = result.metrics["forgetting"]
    assert f["breach_step"] == 2 and result.metrics["global_step"] == 2
    assert [(g["tolerance_metric"], g["breach_step"], g["action"]) for g in f["guards"]] == [("kl", 2, "stop"),
                                                                                            ("loss", None, "warn")]
    # the one-sentence summary: in metrics.json and the card, naming the KL, the breach and the output directory
    written = json.loads((result.output_dir / "metrics.json").read_text())
    summary = written["summary"]
    assert summary.startswith("Domain loss ") and f"KL to the base {f['general_kl_end']:.3f} on `general`" in summary
    assert "guard breached on `general` kl (step 2)" in summary and summary.endswith(f"in {result.output_dir}.")
    assert f"**Summary.** {summary}" in (result.output_dir / "README.md").read_text()
    saved = yaml.safe_load((result.output_dir / "hf_cpt_config.yaml").read_text())["monitor"]
    assert [g["metric"] for g in saved["guards"]] == ["kl", "loss"] and saved["tolerance"] is None


@pytest.mark.slow  # three CLI processes, one killed
def test_distillation_replay_resumes_bitwise_after_a_kill(tmp_path, tiny_model_dir):
    cfg = _synth_cfg(tiny_model_dir, max_steps=8, save_steps=2, eval_steps=4)
    cfg["train"]["distill"] = {"weight": 1.0, "tokens": "replay", "top_k": 8}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path / "cache")
    _check(_cli(["train", str(path), "-o", str(tmp_path / "ref")], env))
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert ref["distilled_tokens"] > 0
    assert "distillation replay" in (tmp_path / "ref" / "README.md").read_text()

    out = tmp_path / "crash"
    target = Path(str(out) + ".checkpoints") / "checkpoint-4" / "trainer_state.json"
    proc = subprocess.Popen([sys.executable, "-m", "hf_cpt.cli.main", "train", str(path), "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert target.exists(), f"no checkpoint before the kill; stderr:\n{err[-3000:]}"
    _check(_cli(["train", str(path), "-o", str(out), "--resume"], env))
    w_ref, w_res = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    res = json.loads((out / "metrics.json").read_text())
    assert res["train_tokens"] == ref["train_tokens"] and res["eval_history"] == ref["eval_history"]


@pytest.mark.slow  # two training runs with distillation
def test_distillation_lowers_kl_to_the_base_on_replay_text(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path / "cache"))
    base = _synth_cfg(tiny_model_dir, max_steps=6, eval_steps=6, learning_rate=3e-3)
    plain = run_cpt(CPTConfig.from_dict(base), output_dir=tmp_path / "plain")
    base["train"]["distill"] = {"weight": 5.0, "tokens": "replay", "top_k": 16}
    distilled = run_cpt(CPTConfig.from_dict(base), output_dir=tmp_path / "distilled")
    kl = lambda r: r.metrics["forgetting"]["general_self_kl_end"]  # noqa: E731
    assert kl(distilled) < kl(plain)


@pytest.mark.slow  # two processes (torchrun)
def test_two_process_run_synthesises_once(tmp_path, tiny_model_dir):
    cfg = _synth_cfg(tiny_model_dir, max_steps=2, per_device_train_batch_size=1, eval_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path / "cache")
    proc = _check(_cli(["train", str(path), "-o", str(tmp_path / "out"), "--nproc", "2"], env))
    # the main process samples each split once; the other process reads its cache
    files = list((tmp_path / "cache" / "synth").glob("*.jsonl.gz"))
    assert len(files) == 2
    lines = proc.stderr.splitlines()
    generated = [line for line in lines if "self-synthesised text" in line and "generated" in line]
    cached = [line for line in lines if "self-synthesised text" in line and "from the cache" in line]
    assert len(generated) == 2 and len(cached) == 2, proc.stderr[-3000:]  # train + eval: generated once each


@pytest.mark.parametrize("change, field", [
    ({"train": {"distill": {"top_k": 100000}}}, "`train.distill.top_k`"),
    ({"monitor": {"kl_top_k": 100000}}, "`monitor.kl_top_k`"),
])
def test_top_k_above_the_vocabulary_is_refused_before_training(tmp_path, tiny_model_dir, change, field):
    d = tiny_run_dict(tiny_model_dir)
    for k, v in change.items():
        d.setdefault(k, {}).update(v)
    with pytest.raises(ValueError, match=field):
        run_cpt(CPTConfig.from_dict(d), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
