"""Two "nodes" x one process (torchrun static rendezvous on localhost) read a prepared store and train exactly
like two processes on one node, and like one process over the on-the-fly mixer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_cpt.config import CPTConfig, DataConfig
from hf_cpt.recipe.prepare import prepare_config
from hf_cpt.testing import make_tiny_tokenizer

from .test_ddp import ENV, _port, _run_checked

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # every test launches CLI processes
WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_two_nodes_match_two_processes_on_one_node(tmp_path):
    store = tmp_path / "store"
    prepare_config(CPTConfig(data=DataConfig(block_size=32, replay_ratio=0.25, prepared_dir=str(store))),
                   make_tiny_tokenizer())
    single, local, nodes = tmp_path / "single", tmp_path / "local", tmp_path / "nodes"
    _run_checked([sys.executable, str(WORKER), str(single), "4"])  # one process, on-the-fly mixer
    _run_checked(_torchrun("--nproc_per_node=2", f"--master_port={_port()}", str(WORKER), str(local), "2",
                           str(store)))
    port = _port()
    procs = [subprocess.Popen(_torchrun("--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                        "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), str(nodes),
                                        "2", str(store)),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for r, proc in enumerate(procs):
        _, err = proc.communicate(timeout=540)
        assert proc.returncode == 0, f"node {r} exited {proc.returncode}:\n{err[-4000:]}"
    one = json.loads((single / "rank0.json").read_text())
    for rank in range(2):
        a = json.loads((local / f"rank{rank}.json").read_text())
        b = json.loads((nodes / f"rank{rank}.json").read_text())
        assert a["world"] == b["world"] == 2
        assert a["seen"] == b["seen"] and a["losses"] == b["losses"]
        assert b["blocks_built"] == 8  # 4 steps x 2 blocks: this rank's blocks only
    r0, r1 = (json.loads((nodes / f"rank{r}.json").read_text())["seen"] for r in range(2))
    for step in range(4):
        assert r0[step] + r1[step] == one["seen"][step]  # together: the one-process, on-the-fly global batch
