"""What a finished run writes next to the adapted model: the recipe, metrics, forgetting plot and model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import CPTConfig
from ..model_card import render_model_card
from ..plotting import plot_forgetting

METRICS_FILE = "metrics.json"
PLOT_FILE = "forgetting.png"
VOCAB_FILE = "hf_cpt_vocab.json"


def write_outputs(cfg: CPTConfig, directory: Path, metrics: dict[str, Any]) -> None:
    """Write `hf_cpt_config.yaml`, `forgetting.png`, `hf_cpt_vocab.json` (vocabulary runs), `metrics.json` and the
    model card `README.md` into `directory` (the staging directory of the run)."""
    cfg.save_pretrained(directory)
    plot_forgetting(
        metrics["eval_history"], directory / PLOT_FILE, cfg.monitor.general, cfg.monitor.domain,
        guards=metrics["forgetting"]["guards"],
        title=f"hf-cpt: {cfg.model.name_or_path}",
        downstream=(metrics.get("downstream") or {}).get("history"),
        domain_sets=[n for n, kind in cfg.data.held_out_kinds().items() if kind == "domain"],
        prediction=metrics["forgetting"].get("prediction"),
    )
    if metrics.get("vocab") is not None:
        (directory / VOCAB_FILE).write_text(json.dumps(metrics["vocab"], indent=2, ensure_ascii=False),
                                            encoding="utf-8")
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    card = render_model_card(cfg.to_dict(), metrics, repo_id=cfg.hub.repo_id if cfg.hub.push_to_hub else None)
    (directory / "README.md").write_text(card, encoding="utf-8")
