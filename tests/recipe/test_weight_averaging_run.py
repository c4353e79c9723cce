"""`weight_averaging:` in a run config: the average is evaluated beside the live model and, with `ship`, written."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_cpt.callbacks.weight_averaging import held_out_loss
from hf_cpt.config import CPTConfig
from hf_cpt.recipe import build_eval_sets, run_cpt
from tests.conftest import tiny_run_dict


def test_a_run_ships_the_average_it_evaluated(tmp_path, tiny_model_dir):
    d = tiny_run_dict(tiny_model_dir, max_steps=4, eval_steps=2)
    d["weight_averaging"] = {"method": "ema", "decay": 0.5, "ship": True}
    cfg = CPTConfig.from_dict(d)
    run_cpt(cfg, output_dir=tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    last = metrics["eval_history"][-1]
    assert last["step"] == 4 and "avg_domain_loss" in last and last["avg_domain_loss"] != last["domain_loss"]
    assert "avg_domain_loss_end" in metrics["forgetting"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sets = build_eval_sets(cfg.data, AutoTokenizer.from_pretrained(tmp_path / "out"))
    from hf_cpt.mixers.packing import DocumentMaskingGuard

    DocumentMaskingGuard.attach(model)
    assert held_out_loss(model, sets["domain"], 4) == pytest.approx(last["avg_domain_loss"], abs=1e-5)
    assert CPTConfig.from_pretrained(tmp_path / "out").weight_averaging.ship is True
    assert "**these weights are the average**" in (tmp_path / "out" / "README.md").read_text()
