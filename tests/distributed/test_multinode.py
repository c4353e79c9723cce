"""Two "nodes" x one process (torchrun static rendezvous on localhost) read a prepared store and train exactly
like two processes on one node, and like one process over the on-the-fly mixer. The three runs are scenarios of
the batched launches (launch.py): `ddp` in one process, `ddp_store` in the 2-process launch, and `nodes=ddp_store`
in the launch of 2 "nodes" x 1 process (which also runs the FSDP resume and `hf-cpt train` under FSDP)."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # reads the batched launches


def test_two_nodes_match_two_processes_on_one_node(launches):
    def ranks(launch, scenario):
        return [json.loads((launches.dir(launch, scenario) / f"rank{r}.json").read_text()) for r in range(2)]

    one = json.loads((launches.dir("one", "ddp") / "rank0.json").read_text())
    for a, b in zip(ranks("two", "ddp_store"), ranks("two", "nodes")):
        assert a["world"] == b["world"] == 2
        assert a["seen"] == b["seen"] and a["losses"] == b["losses"]
        assert b["blocks_built"] == 8  # 4 steps x 2 blocks: this rank's blocks only
    r0, r1 = (r["seen"] for r in ranks("two", "nodes"))
    for step in range(4):
        assert r0[step] + r1[step] == one["seen"][step]  # together: the one-process, on-the-fly global batch
