"""Process launches shared by the distributed tests: the environment, a free port, checked runs, and the few
launches (each running many scenarios of worker.py in turn) that test_fsdp_equal.py, test_ddp.py and
test_multinode.py read their results from (the `launches` fixture in conftest.py).

Why batched: a launch costs a Python start and the torch/transformers imports per process (seconds each on a
2-core machine) plus the gloo rendezvous; one launch per scenario made these tests most of the suite's time.
Every scenario still runs in its own `Trainer`, seeded as before, into a directory of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
WORKER = Path(__file__).with_name("worker.py")

# worker.py scenarios, in launch order. The one-process references run in one plain process; the 2-rank ones in
# one torchrun launch that ends with the SIGKILLed resume run (torchrun then tears the job down: every earlier
# scenario has written its files). The resumed run, `hf-cpt train` under FSDP and the multi-node check run in
# one launch of 2 "nodes" x 1 process (static rendezvous on localhost), after the kill.
TECHNIQUES = ("plain", "chunked", "chunked_head", "rewarm", "rewarm_groups", "mixer", "packing", "distill",
              "distill_head", "kl", "lora", "forget", "vocab")
ONE = ("ddp", *TECHNIQUES, "cli")
TWO = ("ddp", "ddp_store", *TECHNIQUES, "resume:full", "resume:kill")
NODES = ("nodes=ddp_store", "resume:resume", "cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_checked(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure, fail the test with the children's stderr (the only clue under load)."""
    proc = subprocess.run(cmd, env=ENV if env is None else env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd[1:5]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def load(path: Path):
    return torch.load(path, weights_only=False)  # our own files: log histories, dicts of tensors


@dataclass
class Launches:
    """Where the batched launches wrote, and what each printed, for the tests to read their scenario from."""

    root: Path
    stderr: dict[str, str] = field(default_factory=dict)
    returncode: dict[str, int] = field(default_factory=dict)
    after_kill: dict = field(default_factory=dict)  # the killed run's directory, before the resumed run

    def dir(self, launch: str, scenario: str) -> Path:
        """`ROOT/<launch>/<scenario>` once every rank finished it; else fail with that launch's stderr."""
        path = self.root / launch / scenario
        ranks = 1 if launch == "one" else 2
        if not all((path / f"done{r}").exists() for r in range(ranks)):
            raise AssertionError(f"scenario {scenario!r} of launch {launch!r} did not finish (exit "
                                 f"{self.returncode.get(launch)}):\n{self.stderr.get(launch, '')[-6000:]}")
        return path

    def pair(self, mode: str):
        """(one-process result, [rank 0, rank 1] of the FSDP2 run) of the Trainer scenario `mode`."""
        single = load(self.dir("one", mode) / "rank0.pt")
        ranks = [load(self.dir("two", mode) / f"rank{i}.pt") for i in range(2)]
        assert single["world"] == 1 and not single["sharded"]
        for r in ranks:  # really sharded: accelerate took its FSDP branch and the parameters are DTensors
            assert r["world"] == 2 and r["distributed_type"] == "DistributedType.FSDP" and r["sharded"]
        return single, ranks


def launch_all(root: Path, store: Path, run_yaml: Path) -> Launches:
    """The three launches (see the scenario lists above); the one-process references run alongside the first."""
    env = dict(ENV, HF_CPT_TEST_STORE=str(store), HF_CPT_TEST_RUN_YAML=str(run_yaml))
    out = Launches(root)

    def start(name, cmd):
        return name, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(name, proc):
        out.stderr[name] = proc.communicate()[1]
        out.returncode[name] = proc.returncode

    one = start("one", [sys.executable, str(WORKER), str(root / "one"), "4", *ONE])
    finish(*start("two", torchrun("--nproc_per_node=2", f"--master_port={free_port()}", str(WORKER),
                                  str(root / "two"), "2", *TWO)))
    run = root / "two" / "resume-run"
    out.after_kill = {"checkpoints": sorted(p.name for p in (run / "trainer").iterdir()) if run.exists() else [],
                      "final": (run / "final").exists()}
    port = free_port()
    nodes = [start(f"node{r}", torchrun("--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                        "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER),
                                        str(root / "two"), "2", *NODES)) for r in range(2)]
    for node in nodes:
        finish(*node)
    out.stderr["nodes"] = out.stderr["node0"] + out.stderr["node1"]
    out.returncode["nodes"] = out.returncode["node0"] or out.returncode["node1"]
    finish(*one)
    return out
