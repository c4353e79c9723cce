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


def test_card_says_per_guarded_set_which_bound_applies_and_the_summary():
    """Two guards: one row each (set, metric, bound, end value, breached), both in the metadata, and the run's
    one-sentence summary; a metrics.json written before guards were a list still renders its one guard."""
    from hf_cpt.monitoring import summarize_run

    f = {**_metrics()["forgetting"], "general_self_loss_start": 3.6, "general_self_loss_end": 3.7,
         "general_self_kl_end": 0.15, "general_kl_end": 0.31, "tolerance_breached": True, "breach_step": 20,
         "guards": [{"guarded_set": "general_self", "tolerance_metric": "kl", "tolerance": 0.2,
                     "tolerance_mode": "absolute", "start": 0.0, "end": 0.15, "tolerance_bound": 0.2,
                     "tolerance_breached": False, "breach_step": None},
                    {"guarded_set": "general", "tolerance_metric": "loss", "tolerance": 0.1,
                     "tolerance_mode": "absolute", "start": 3.3, "end": 3.45, "tolerance_bound": 3.4,
                     "tolerance_breached": True, "breach_step": 20}]}
    summary = summarize_run(f, "domain", "runs/x")
    assert summary == ("Domain loss 3.200 -> 3.000 (-0.200 nats/token); KL to the base 0.150 on `general_self` "
                       "(bound 0.200); loss 3.450 on `general` (bound 3.400); KL to the base 0.310 on `general`; guard "
                       "breached on `general` loss (step 20); model, metrics.json, forgetting.png and card in runs/x.")
    # a set with a KL guard and a loss guard: its KL is named once
    both = {**f, "guards": [{**f["guards"][0], "guarded_set": "general"}, f["guards"][1]]}
    assert summarize_run(both, "domain", "o").count("KL to the base") == 1
    metrics = {**_metrics(), "forgetting": f, "summary": summary}
    card = render_model_card(CPTConfig().to_dict(), metrics)
    assert ("| general_self | KL to base | 0.2000 | 0.1500 | no | KL to the base on `general_self` <= 0.2000 nats "
            "(absolute tolerance 0.2): not breached |") in card
    assert "| general | loss | 3.4000 | 3.4500 | yes, first at step 20 |" in card
    assert f"**Summary.** {summary}" in card
    meta = yaml.safe_load(card.split("---")[1])["hf_cpt"]["forgetting"]
    assert [(g["guarded_set"], g["tolerance_breached"]) for g in meta["guards"]] == [("general_self", False),
                                                                                      ("general", True)]
    old = render_model_card(CPTConfig().to_dict(), _metrics())  # top-level fields, no `guards`
    assert "| general | loss | n/a | 3.1000 | no |" in old
    held = summarize_run({**f, "guards": [{**f["guards"][0]}]}, "domain", "out")
    assert held.endswith("on `general_self` (bound 0.200); guard held; model, metrics.json, forgetting.png and "
                         "card in out.")
