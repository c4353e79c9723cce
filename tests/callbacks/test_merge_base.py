"""`merge_base:` merging with the base as part of the run: evaluated beside the live model, shipped at the end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_cpt.callbacks.merge_base import MergeBaseCallback, MergeBaseConfig, base_snapshot
from hf_cpt.callbacks.weight_averaging import held_out_loss
from hf_cpt.config import CPTConfig
from hf_cpt.recipe import build_eval_sets, run_cpt
from hf_cpt.testing import make_tiny_llama
from tests.conftest import tiny_run_dict


def _moved(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_the_merge_is_the_interpolation_exact_at_both_ends_and_swapping_restores_the_model():
    model = make_tiny_llama(64)
    base = base_snapshot(model)
    _moved(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    for alpha, want in ((0.0, base), (1.0, trained)):
        merged = MergeBaseCallback(MergeBaseConfig(alpha=alpha), base).merged_weights(model)
        assert all(torch.equal(merged[n], want[n]) for n in base)  # bit for bit at both ends
    cb = MergeBaseCallback(MergeBaseConfig(alpha=0.25), base, new_rows_from=60)
    merged = cb.merged_weights(model)
    name = "model.embed_tokens.weight"
    assert torch.allclose(merged[name][:60], base[name][:60] + 0.25 * (trained[name][:60] - base[name][:60]))
    assert torch.equal(merged[name][60:], trained[name][60:])  # new tokens' rows: the trained model's
    with cb.swapped_in(model):
        assert torch.equal(model.model.embed_tokens.weight, merged[name])
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=3, max_steps=4)
    ship0 = MergeBaseCallback(MergeBaseConfig(alpha=0.0), base)
    ship0.on_step_end(None, state, TrainerControl(), model=model)
    assert not ship0.shipped  # not before the last update
    state.global_step = 4
    ship0.on_step_end(None, state, TrainerControl(), model=model)
    ship0.on_train_end(None, state, TrainerControl(), model=model)  # once only
    assert ship0.shipped and all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # alpha 0: the base


def test_a_lora_model_merges_at_adapter_strength_alpha():
    pytest.importorskip("peft")
    from hf_cpt.adapters import add_lora_for_cpt

    model = add_lora_for_cpt(make_tiny_llama(64), r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                             embeddings="none")
    base = base_snapshot(model)
    assert base and all("lora_" in n for n in base)  # only the adapter trains
    _moved(model)  # B leaves zero: the adapter now changes the model
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    trained_delta = q.get_delta_weight("default").clone()
    with MergeBaseCallback(MergeBaseConfig(alpha=0.3), base).swapped_in(model):
        assert torch.allclose(q.get_delta_weight("default"), 0.3 * trained_delta, atol=1e-6)


def test_bad_settings_get_one_line_naming_the_field():
    with pytest.raises(ValueError, match="`alpha`"):
        MergeBaseConfig(alpha=1.5)
    with pytest.raises(ValueError, match="`merge_base.ship` and `weight_averaging.ship`"):
        CPTConfig.from_dict({"merge_base": {"alpha": 0.5}, "weight_averaging": {"ship": True}})
    with pytest.raises(ValueError, match="`merged_\\*` the merge"):
        CPTConfig.from_dict({"data": {"eval_sets": {"merged_x": "a.jsonl"}}})
    guard = {"monitor": {"guards": [{"set": "merged_general", "metric": "kl", "tolerance": 0.2}]}}
    CPTConfig.from_dict({"merge_base": {"alpha": 0.5}, **guard}).check_held_out_sets()  # the merge can be guarded
    with pytest.raises(ValueError, match="`monitor.guards\\[0\\].set` is 'merged_general'"):
        CPTConfig.from_dict(guard).check_held_out_sets()  # ... only when the run merges


def test_a_run_evaluates_the_merge_beside_the_live_model_and_ships_it(tmp_path, tiny_model_dir):
    d = tiny_run_dict(tiny_model_dir, max_steps=4, eval_steps=2)
    d["merge_base"] = {"alpha": 0.5}
    d["monitor"] = {"kl": True, "kl_top_k": 8,
                    "guards": [{"set": "merged_general", "metric": "kl", "tolerance": 5.0}]}
    cfg = CPTConfig.from_dict(d)
    run_cpt(cfg, output_dir=tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    first, mid, last = metrics["eval_history"]
    assert first["merged_domain_loss"] == first["domain_loss"]  # step 0: the merge is the base
    assert mid["step"] == 2 and mid["merged_domain_loss"] != mid["domain_loss"]
    assert 0 < mid["merged_general_kl"] < mid["general_kl"]  # halfway back to the base: nearer to it
    # shipped after the last update, before the final evaluation: the end numbers are the saved model's
    assert last["step"] == 4 and last["merged_domain_loss"] == last["domain_loss"]
    assert last["merged_general_kl"] == last["general_kl"] > 0
    assert metrics["forgetting"]["merged_general_kl_end"] == last["merged_general_kl"]
    (guard,) = metrics["forgetting"]["guards"]
    assert guard["guarded_set"] == "merged_general" and guard["end"] == last["merged_general_kl"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # what was saved: the merge
    sets = build_eval_sets(cfg.data, AutoTokenizer.from_pretrained(tmp_path / "out"))
    from hf_cpt.mixers.packing import DocumentMaskingGuard

    DocumentMaskingGuard.attach(model)
    assert held_out_loss(model, sets["domain"], 4) == pytest.approx(last["domain_loss"], abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w, b = model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, b)
    assert "**these weights are the merge**" in (tmp_path / "out" / "README.md").read_text()
