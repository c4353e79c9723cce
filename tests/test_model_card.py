"""The model card's recipe lines and metadata, from a config and metrics alone."""

from __future__ import annotations

import yaml

from hf_cpt.config import CPTConfig
from hf_cpt.model_card import recipe_lines, render_model_card


def _metrics():
    return {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "global_step": 40,
            "train_tokens": {"domain": 300, "general": 100},
            "vocab": {"added": 5000, "model_type": "BPE", "fertility_before": 1.97, "fertility_after": 1.85},
            "forgetting": {"general_loss_start": 3.3, "general_loss_end": 3.1, "general_delta": -0.2,
                           "general_delta_rel": -0.06, "domain_loss_start": 3.2, "domain_loss_end": 3.0,
                           "domain_delta": -0.2, "domain_delta_rel": -0.06, "tolerance": 0.05,
                           "tolerance_mode": "relative", "tolerance_breached": False}}


def test_recipe_lines_name_every_technique():
    cfg = CPTConfig.from_dict({
        "domain": "Medical notes",
        "data": {"replay_ratio": 0.1, "replay_stages": [{"start": 0.8, "replay_ratio": 0.02}],
                 "cmr": {"cmr": 0.9, "budget_tokens": 2e9, "tolerance": 0.05, "tolerance_mode": "relative"},
                 "domain": {"train": "hub:org/med:train"}},
        "schedule": {"schedule": "rewarm", "warmup_steps": 10, "decay": "1-sqrt"},
        "active_forgetting": {"every_k_updates": 100},
        "vocab": {"n_new_tokens": 5000, "init": "ofa"},
    }).to_dict()
    # masked runs mix chunks by probability and refuse replay stages: their line comes from a config of its own
    masked = CPTConfig.from_dict({"data": {"replay_ratio": 0.1}, "masking": {"kind": "lem", "span_weight": 3.0}})
    text = "\n".join(recipe_lines(cfg, _metrics()) + recipe_lines(masked.to_dict(), _metrics()))
    for needle in ("replay: 10.0%", "2.0% from 80% of the run", "critical domain share 0.900 at 2e+09 tokens",
                   "training tokens: 400 (domain: 300 = 75.0%", "`rewarm`", "1-sqrt re-decay",
                   "masking: kind=lem", "vocabulary extension: 5000 domain subwords", "`ofa` (top-k 10, temperature 0.1)",
                   "fertility 1.970 -> 1.850", "embeddings reset every 100 updates"):
        assert needle in text, needle
    card = render_model_card(cfg, _metrics(), repo_id="me/med")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["tags"] == ["continual-pretraining", "hf-cpt", "medical-notes"]
    assert meta["datasets"] == ["org/med"] and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["hf_cpt"]["forgetting"]["domain_loss_end"] == 3.0
    assert 'from_pretrained("me/med")' in card
