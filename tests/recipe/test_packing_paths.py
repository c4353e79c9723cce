"""`data.packing: documents` on every data path of a run: the training stream, the prepared store, held-out
blocks, distillation targets, the KL monitor; `concat` and masked runs as documented."""

from __future__ import annotations

import json

import pytest
import torch

import hf_cpt.base_targets as distill_mod
from hf_cpt.config import CPTConfig
from hf_cpt.mixers.packing import DocumentMaskingGuard
from hf_cpt.mixers.prepared import MANIFEST, PreparedStore
from hf_cpt.recipe import run_cpt
from hf_cpt.recipe.data import build_eval_sets
from hf_cpt.recipe.prepare import prepare_config

from ..conftest import tiny_run_dict

pytestmark = pytest.mark.timeout(900)


def _spy(monkeypatch):
    """Record what reaches the model (before the guard fixes anything) and what the KL/distill passes get."""
    seen = {"forward": [], "logit_chunks": []}
    hook = DocumentMaskingGuard._hook

    def spying_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen["forward"].append({"position_ids": kwargs.get("position_ids") is not None,
                                "mask": None if mask is None else bool((mask != 0).all())})
        return hook(self, module, args, kwargs)

    chunks = distill_mod._logit_chunks

    def spying_chunks(model, input_ids, attention_mask, batch_size, chunk_tokens, position_ids=None):
        seen["logit_chunks"].append(position_ids is not None and attention_mask is None)
        yield from chunks(model, input_ids, attention_mask, batch_size, chunk_tokens, position_ids)

    monkeypatch.setattr(DocumentMaskingGuard, "_hook", spying_hook)
    monkeypatch.setattr(distill_mod, "_logit_chunks", spying_chunks)
    return seen


def _run_dict(model_dir, **data):
    cfg = tiny_run_dict(model_dir, max_steps=3, eval_steps=3)
    cfg["data"].update(data)
    cfg["monitor"]["kl_top_k"] = 8
    return cfg


@pytest.mark.slow  # training runs on every data path
def test_no_path_emits_an_all_ones_mask_or_drops_positions(tmp_path, tiny_model_dir, monkeypatch):
    """Training and evaluation batches, distillation targets and the KL monitor of one run with self-synthesised
    replay: every forward sees restarting position_ids and no attention mask."""
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path / "cache"))
    seen = _spy(monkeypatch)
    cfg = _run_dict(tiny_model_dir)
    cfg["data"]["synth"] = {"eval_tokens": 96, "max_new_tokens": 24, "batch_size": 8}
    cfg["train"]["distill"] = {"weight": 1.0, "tokens": "replay", "top_k": 8}
    result = run_cpt(CPTConfig.from_dict(cfg), output_dir=tmp_path / "out")
    assert result.metrics["distilled_tokens"] > 0
    assert len(seen["forward"]) >= 3 + 2  # 3 training steps, evaluations at step 0 and 3
    assert all(f["position_ids"] and f["mask"] is None for f in seen["forward"]), seen["forward"]
    # KL targets and evaluations on two general sets, plus the distillation targets
    assert len(seen["logit_chunks"]) >= 5 and all(seen["logit_chunks"])


@pytest.mark.slow  # training runs through run_cpt
def test_concat_runs_keep_the_old_layout(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path / "cache"))
    seen = _spy(monkeypatch)
    cfg = CPTConfig.from_dict(_run_dict(tiny_model_dir, packing="concat"))
    run_cpt(cfg, output_dir=tmp_path / "out")
    assert seen["forward"] == []  # no guard on concat runs
    assert seen["logit_chunks"] and not any(seen["logit_chunks"])
    sets = build_eval_sets(cfg.data, _tokenizer(tiny_model_dir))
    assert set(sets["domain"].column_names) == {"input_ids", "attention_mask", "labels"}


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_held_out_blocks_are_document_packed(tiny_model_dir):
    cfg = CPTConfig.from_dict(_run_dict(tiny_model_dir))
    sets = build_eval_sets(cfg.data, _tokenizer(tiny_model_dir))
    for name, blocks in sets.items():
        assert set(blocks.column_names) == {"input_ids", "position_ids", "labels"}, name
        pos = torch.tensor(blocks["position_ids"])
        labels = torch.tensor(blocks["labels"])
        restarts = (pos == 0)
        restarts[:, 0] = False
        assert (labels[restarts] == -100).all() and (labels[~restarts] != -100).all()


@pytest.mark.slow  # a prepared store and a training run
def test_prepared_store_follows_the_packing_and_old_stores_are_refused(tmp_path, tiny_model_dir):
    cfg = CPTConfig.from_dict(_run_dict(tiny_model_dir, prepared_dir=str(tmp_path / "store")))
    store = prepare_config(cfg)
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["fingerprint"]["version"] == 2 and manifest["fingerprint"]["bos"] is None  # no BOS in the tiny tokenizer
    manifest["fingerprint"]["version"] = 1
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"format 1.*hf-cpt prepare CONFIG --overwrite"):
        PreparedStore(store)


@pytest.mark.parametrize("objective,masking", [("clm", "lem"), ("mlm", "random")])
def test_masked_runs_refuse_concat(tiny_model_dir, objective, masking):
    cfg = _run_dict(tiny_model_dir, packing="concat")
    cfg.update(objective=objective, masking=masking)
    with pytest.raises(ValueError, match=r"`data.packing` \('concat'\): masked runs"):
        CPTConfig.from_dict(cfg)
