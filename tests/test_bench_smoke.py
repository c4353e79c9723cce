"""The data-at-scale and GPU-throughput benches run end to end at tiny, CPU-sized shapes, so they cannot rot."""

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


def test_gpu_throughput_tiny_shape_on_cpu():
    out = _run("gpu_throughput.py", "--tiny", "--steps", "1", "--warmup", "1")
    for vocab in ("1024", "2048"):
        assert f"vocab {vocab:>6} Trainer          loss=standard" in out
        assert f"vocab {vocab:>6} hf-cpt           loss=chunked" in out  # no CUDA: hf-cpt's chunked loss
        assert f"vocab {vocab:>6} Trainer + Liger  skipped" in out
        assert f"vocab {vocab:>6} hf-cpt vs Trainer: tokens/s x" in out


def test_data_scale_tiny_stream():
    out = _run("data_scale.py", "--blocks", "16", "--block-size", "64", "--seek-block", "500", "--repeats", "1",
               "--long-blocks", "64")
    assert "num_proc=1" in out and "num_proc=2" in out
    for world in (1, 2, 8, 64):
        assert any(line.split()[:1] == [str(world)] for line in out.splitlines())
    assert "per-rank cost at 64 ranks / 1 rank" in out and "resume at block 500" in out
