"""Hub push against a local Hub-API server (tests/hub_server.py), driven by the real `huggingface_hub` client.

Nothing here contacts the real Hub: every client is pointed at 127.0.0.1 (HF_ENDPOINT / `endpoint=`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hf_cpt.config import CPTConfig
from hf_cpt.hub import HubConfig, check_repo_id, push_adapted
from hf_cpt.recipe.train import run_cpt

from .conftest import tiny_run_dict
from .hub_server import HubServer

ALICE = "hf_alice_SECRET_0123456789abcdef"  # distinctive, so a leak is found by a plain substring search
BOB = "hf_bob_SECRET_fedcba9876543210"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hub():
    with HubServer({ALICE: ("alice", ["lab"]), BOB: ("bob", [])}) as server:
        yield server


@pytest.fixture()
def online(monkeypatch):
    """The test session runs with HF_HUB_OFFLINE=1; in-process pushes to the local server need it off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/hf-cpt-test/token")


@pytest.fixture(scope="module")
def adapted_dir(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "run"
    cfg = CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir, max_steps=2), "domain": "Python docs",
                               "vocab": {"n_new_tokens": 40, "init": "subword_mean"}})  # an extended vocabulary
    run_cpt(cfg, output_dir=out)
    return out


def _env(hub: HubServer, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    if token:
        env["HF_TOKEN"] = token
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=300)


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from huggingface_hub import ModelCard
    repo, local, out = sys.argv[1:4]  # argv[4]: a domain text that uses the new tokens
    remote_model = AutoModelForCausalLM.from_pretrained(repo)
    local_model = AutoModelForCausalLM.from_pretrained(local)
    rs, ls = remote_model.state_dict(), local_model.state_dict()
    same = rs.keys() == ls.keys() and all(torch.equal(rs[k], ls[k]) for k in rs)
    texts = ["def parse(argv): return sorted(argv)", "In the beginning God created the heaven",
             open(sys.argv[4]).read()]
    rt, lt = AutoTokenizer.from_pretrained(repo), AutoTokenizer.from_pretrained(local)
    card = ModelCard.load(repo)
    json.dump({"weights_equal": same, "tied": remote_model.lm_head.weight.data_ptr()
               == remote_model.model.embed_tokens.weight.data_ptr(),
               "tokens_equal": [rt(t)["input_ids"] == lt(t)["input_ids"] for t in texts],
               "vocab": [len(rt), len(lt)], "card_data": card.data.to_dict(), "card_text": card.text},
              open(out, "w"))
""")


@pytest.mark.slow  # CLI and loader processes against the local Hub server
def test_push_via_cli_then_load_with_stock_transformers(hub, adapted_dir, tmp_path):
    env = _env(hub, tmp_path / "home", ALICE)
    res = _cli(["push", str(adapted_dir), "--repo-id", "alice/tiny-cpt", "--private"], env)
    assert res.returncode == 0, res.stderr
    assert "alice/tiny-cpt" in res.stdout
    files = hub.files("alice/tiny-cpt")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.json",
            "forgetting.png", "hf_cpt_config.yaml"} <= set(files)
    assert not any(p.endswith((".bin", ".pt")) for p in files)
    lfs_puts = [r for r in hub.requests if r[0] == "PUT" and r[1].startswith("/lfs-upload/")]
    assert lfs_puts, "the weights must go through the LFS upload path"

    (tmp_path / "load.py").write_text(LOAD_SCRIPT)
    out = tmp_path / "loaded.json"
    from hf_cpt.testing import read_embedded

    (tmp_path / "domain.txt").write_text(read_embedded("python-docs", "validation", limit=1)[0][:2000])
    load = subprocess.run([sys.executable, str(tmp_path / "load.py"), "alice/tiny-cpt", str(adapted_dir), str(out),
                           str(tmp_path / "domain.txt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["weights_equal"] and got["tied"]
    assert all(got["tokens_equal"]) and got["vocab"][0] == got["vocab"][1]
    vocab = json.loads(files["hf_cpt_vocab.json"])
    assert got["vocab"][0] == vocab["new_vocab_size"] == vocab["old_vocab_size"] + 40
    data = got["card_data"]
    assert {"continual-pretraining", "hf-cpt", "python-docs"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    metrics = json.loads((adapted_dir / "metrics.json").read_text())
    f = metrics["forgetting"]
    assert data["hf_cpt"]["forgetting"]["general_loss_end"] == pytest.approx(f["general_loss_end"])
    assert data["hf_cpt"]["forgetting"]["domain_loss_start"] == pytest.approx(f["domain_loss_start"])
    assert data["hf_cpt"]["train_tokens"] == metrics["train_tokens"]
    text = got["card_text"]
    assert f"{f['general_loss_end']:.4f}" in text and f"{f['domain_loss_end']:.4f}" in text
    assert "replay: 25.0% of training tokens" in text and "forgetting.png" in text
    assert "vocabulary extension: 40 domain subwords" in text
    assert 'from_pretrained("alice/tiny-cpt")' in text

    # the repo is private: no token, no access
    anon = _env(hub, tmp_path / "home-anon", None)
    denied = subprocess.run([sys.executable, "-c", "from transformers import AutoConfig; "
                             "AutoConfig.from_pretrained('alice/tiny-cpt')"], env=anon, capture_output=True,
                            text=True, timeout=300)
    assert denied.returncode != 0
    assert "alice/tiny-cpt" in denied.stderr

    # no token anywhere: stdout/stderr of both processes, the uploaded files, the HF caches, the local output
    leaks = [res.stdout, res.stderr, load.stdout, load.stderr]
    leaks += [b.decode("latin-1") for b in files.values()]
    for root in (tmp_path, adapted_dir):
        leaks += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    assert not any(ALICE in s for s in leaks)


@pytest.mark.slow  # a CLI process: HF_ENDPOINT is read once, at import
def test_wrong_token_is_refused_clearly(hub, adapted_dir, tmp_path):
    res = _cli(["push", str(adapted_dir), "--repo-id", "alice/x"], _env(hub, tmp_path, "hf_not_a_real_token"))
    assert res.returncode == 2
    assert "token was rejected" in res.stderr and "HF_TOKEN" in res.stderr and "Traceback" not in res.stderr
    assert "hf_not_a_real_token" not in res.stderr + res.stdout
    assert "alice/x" not in hub.repos


@pytest.mark.slow  # the module's adapted run (vocabulary extension + training)
def test_missing_token(hub, adapted_dir, online):
    with pytest.raises(PermissionError, match="no Hugging Face token found.*HF_TOKEN.*hf auth login"):
        push_adapted(adapted_dir, "alice/x", endpoint=hub.url)


@pytest.mark.slow  # the module's adapted run
def test_repo_of_someone_else(hub, adapted_dir, online):
    push_adapted(adapted_dir, "bob/model", token=BOB, endpoint=hub.url)
    with pytest.raises(PermissionError, match="cannot write to namespace 'bob'") as e:
        push_adapted(adapted_dir, "bob/model", token=ALICE, endpoint=hub.url)
    assert ALICE not in str(e.value)
    # an organisation the user belongs to is fine, and a second push to an existing repo is a new commit
    push_adapted(adapted_dir, "lab/model", token=ALICE, endpoint=hub.url)
    first = hub.repos["lab/model"].branches["main"]
    push_adapted(adapted_dir, "lab/model", token=ALICE, endpoint=hub.url, revision="v2")
    assert hub.repos["lab/model"].branches["main"] == first and "v2" in hub.repos["lab/model"].branches
    assert hub.files("lab/model", "v2").keys() == hub.files("lab/model").keys()


@pytest.mark.slow  # the module's adapted run
def test_server_side_refusal_is_a_permission_error(hub, adapted_dir, online):
    # the server refuses (e.g. read-only token) although the namespace check passes
    hub.new_repo("lab/locked", owner="someone-else", private=False)
    with pytest.raises(PermissionError, match="refused to write.*lab/locked"):
        push_adapted(adapted_dir, "lab/locked", token=ALICE, endpoint=hub.url)


def test_not_a_checkpoint(tmp_path, hub, online):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors.*pickled weights"):
        push_adapted(tmp_path, "alice/x", token=ALICE, endpoint=hub.url)
    with pytest.raises(FileNotFoundError, match="output_dir"):
        push_adapted(tmp_path / "missing", "alice/x", token=ALICE, endpoint=hub.url)


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "a/b c", "", 3])
def test_repo_id_validation(bad):
    with pytest.raises(ValueError, match="repo_id"):
        check_repo_id(bad)


def test_hub_config_validation():
    with pytest.raises(ValueError, match="`hub.repo_id` is not set"):
        CPTConfig.from_dict({"hub": {"push_to_hub": True}})
    with pytest.raises(ValueError, match="`hub.repo_id`"):
        CPTConfig.from_dict({"hub": {"repo_id": "bad id"}})
    assert HubConfig(push_to_hub=True, repo_id="a/b").private is False


@pytest.mark.slow  # a training run that pushes
def test_train_pushes_when_configured(hub, tiny_model_dir, tmp_path, online, monkeypatch):
    d = tiny_run_dict(tiny_model_dir, max_steps=1)
    d["hub"] = {"push_to_hub": True, "repo_id": "alice/pushed", "private": True}
    cfg = CPTConfig.from_dict(d)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import
    # a bad token fails before any training (no output directory is created)
    with pytest.raises(PermissionError, match="rejected"):
        run_cpt(cfg, output_dir=tmp_path / "out", hub_token="hf_wrong")
    assert not (tmp_path / "out").exists()
    result = run_cpt(cfg, output_dir=tmp_path / "out", hub_token=ALICE)
    assert result.metrics["hub_commit_url"].startswith(hub.url)
    files = hub.files("alice/pushed")
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["hf_cpt"]["global_step"] == 1 and hub.repos["alice/pushed"].private
