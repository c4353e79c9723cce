"""The data-at-scale and GPU benches (and `bench/gpu_run.sh`, the one command a GPU session runs) run end to end at
tiny, CPU-sized shapes, so they cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow  # a bench process per variant
def test_gpu_throughput_tiny_shape_on_cpu_one_process_per_variant():
    out = _run("gpu_throughput.py", "--tiny", "--steps", "1", "--warmup", "1", "--variants", "hfcpt_chunked")
    assert "isolation: process" in out and "FAILED" not in out
    assert "seq    64 batch  2 (d) hf-cpt chunked  loss=chunked" in out


GPU_VARIANTS = {"trainer", "trainer_liger", "hfcpt", "hfcpt_chunked", "hfcpt_distill", "hfcpt_packing"}


@pytest.mark.slow  # ~40 s on 2 cores: nine Python processes importing torch + transformers
def test_gpu_run_script_tiny_on_cpu_writes_the_results_a_gpu_session_reads(tmp_path):
    out = tmp_path / "out"
    env = dict(ENV, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_run.sh"), "--tiny"], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}{proc.stderr[-999:]}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_results.json", "gpu_run.log"]  # at most 8 files come back
    log = (out / "gpu_run.log").read_text()
    assert "=== [install_wheels] skipped: --tiny installs nothing" in log and "missing:" in log
    r = json.loads((out / "gpu_results.json").read_text())
    assert r["meta"]["tiny"] is True and r["env"]["found"]["torch"]
    assert all(s["exit"] == 0 or str(s["exit"]).startswith("skipped") for s in r["steps"].values()), r["steps"]
    assert {"env_before", "gpu_tests", "checks", "loss", "throughput_tiny_seq64", "profile"} <= set(r["steps"])
    runs = r["throughput"]["tiny"]["seq64"]
    assert set(runs) == GPU_VARIANTS
    for name in GPU_VARIANTS - {"trainer_liger", "hfcpt_packing"}:
        assert runs[name]["tokens_per_s"] > 0, runs[name]
    assert "CUDA" in runs["trainer_liger"]["skipped"]
    assert runs["hfcpt_packing"].get("tokens_per_s", 0) > 0 or "packing" in runs["hfcpt_packing"]["skipped"]
    assert runs["hfcpt"]["loss"] == "chunked" and runs["hfcpt_distill"]["loss"] == "chunked"  # no CUDA: no Liger
    assert r["checks"]["failed"] == [] and r["checks"]["checks"]["d_chunked"]["pass"]
    assert "skipped" in r["checks"]["checks"]["b_liger"]
    loss = r["loss"]["runs"]["vocab1024"]
    assert loss["chunked"]["ms"] > 0 and loss["chunked"]["loss_diff_vs_hf"] < 1e-4 and "skipped" in loss["cce"]
    assert r["profile"]["runs"]["seq64"]["hfcpt"]["top_ops"]


@pytest.mark.slow  # a bench process (~48 s under load)
def test_data_scale_tiny_stream():
    out = _run("data_scale.py", "--blocks", "16", "--block-size", "64", "--seek-block", "500", "--repeats", "1",
               "--long-blocks", "64")
    assert "num_proc=1" in out and "num_proc=2" in out
    for world in (1, 2, 8, 64):
        assert any(line.split()[:1] == [str(world)] for line in out.splitlines())
    assert "per-rank cost at 64 ranks / 1 rank" in out and "resume at block 500" in out


@pytest.mark.slow  # ~30 s on 2 cores: two tiny runs through run_cpt, scored per document
def test_packing_bench_tiny_compares_both_layouts_on_the_same_tokens(tmp_path):
    out = _run("packing.py", "--tiny", "--orders", "0", "--out", str(tmp_path / "packing.json"))
    assert "same training tokens per source in both settings: True" in out
    assert "verdict: held-out loss documents <= concat" in out
    r = json.loads((tmp_path / "packing.json").read_text())
    assert [row["packing"] for row in r["rows"]] == ["documents", "concat"]
    assert {"domain_loss", "general_loss", "general_self_loss", "domain_kl", "step_s"} <= set(r["rows"][0])


def test_dedup_bench_planted_truth_and_a_small_scale_run(tmp_path):
    out = tmp_path / "dedup.json"
    _run("dedup.py", "--parts", "planted,scale", "--mb", "2", "--workers", "1", "--no-tokenize", "--out", str(out))
    result = json.loads(out.read_text())
    at = result["planted"]["0.8"]
    assert at["precision"] >= 0.95 and at["recall"] >= 0.9
    assert result["planted"]["decontamination"]["vs_naive_reference"] == [1.0, 1.0]
    assert result["scale"]["runs"]["all/workers=1"]["removed"] > 0
