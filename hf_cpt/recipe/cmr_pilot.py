"""Pilot runs for the CMR fit: short trainings at several domain shares, evaluated at several token budgets.

One run per domain share r (replay share 1 - r) with a constant learning rate after a short warmup, so every
evaluation along the run is a valid "budget" (with a decaying schedule an early evaluation would not stand for a
shorter run). The forgetting monitor's history gives the held-out general and domain losses at step 0 (the
pre-CPT baseline) and every `max_steps / num_budgets` updates.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..callbacks.progress import training_bar_label
from ..callbacks.rewarm import RewarmConfig
from ..config import CPTConfig, write_yaml
from ..mixers.cmr import CMRFit, CMRPrediction, CMRRecord, write_records
from ..mixers.cmr_select import CMRSelection, SelectedCMRPrediction
from ..validation import check_int

logger = logging.getLogger(__name__)


def pilot_configs(cfg: CPTConfig, domain_ratios: Sequence[float], num_budgets: int) -> list[CPTConfig]:
    """One config per domain share: `data.replay_ratio = 1 - r`, constant LR after warmup, an evaluation at each
    of `num_budgets` evenly spaced budgets."""
    if cfg.data.general is None:
        raise ValueError("`data.general` is required for a CMR pilot: the mixture is domain vs general")
    ratios = [float(r) for r in domain_ratios]
    if len(set(ratios)) < 3 or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"`domain_ratios` needs >= 3 distinct domain shares in [0, 1], got {list(domain_ratios)}")
    check_int("num_budgets", num_budgets, minimum=3)
    steps = cfg.train.max_steps
    if steps % num_budgets:
        raise ValueError(f"`train.max_steps` ({steps}) must be a multiple of `num_budgets` ({num_budgets}) so the "
                         "budgets are evenly spaced")
    warmup = cfg.schedule.warmup_steps if cfg.schedule is not None else cfg.train.warmup_steps
    schedule = RewarmConfig(schedule="constant", warmup_steps=min(warmup, steps // num_budgets))
    return [cfg.override({"data.replay_ratio": 1.0 - r, "data.replay_stages": [], "train.warmup_steps": 0, "train.lr_scheduler_type": None,
                          "train.eval_steps": steps // num_budgets, "schedule": schedule, "monitor.action": "none",
                          "merge_base": None})  # the trained model's curve, not a merge
            for r in ratios]


def run_cmr_pilot(cfg: CPTConfig, domain_ratios: Sequence[float], num_budgets: int, output: str | Path,
                  max_steps: int | None = None) -> list[CMRRecord]:
    """Run the pilots and write the records CSV (`ratio,tokens,general_loss,domain_loss`) to `output`.

    Args:
        cfg: the run to plan; its `train.max_steps` (or `max_steps`) is each pilot's length.
        domain_ratios: >= 3 domain shares to try.
        num_budgets: evaluations per pilot (token budgets), evenly spaced.
        output: the records CSV.
        max_steps: overrides `train.max_steps` for the pilots.
    """
    if max_steps is not None:
        cfg = cfg.override({"train.max_steps": max_steps})
    from .train import run_cpt

    configs = pilot_configs(cfg, domain_ratios, num_budgets)
    records: list[CMRRecord] = []
    tokens_per_step = (cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
                       * cfg.data.block_size)
    with tempfile.TemporaryDirectory(prefix="hf-cpt-pilot-") as tmp:
        for i, c in enumerate(configs):
            r = 1.0 - c.data.replay_ratio
            logger.info("CMR pilot %d/%d: domain share %.3g", i + 1, len(configs), r)
            with training_bar_label(f"CMR pilot {i + 1}/{len(configs)} domain {r:.3g}"):
                result = run_cpt(c, output_dir=Path(tmp) / f"r{i}")
            world = result.metrics.get("world_size", 1)
            g, d = c.monitor.general, c.monitor.domain
            for row in result.metrics["eval_history"]:
                if f"{g}_loss" in row and f"{d}_loss" in row:
                    records.append(CMRRecord(round(r, 10), float(row["step"] * tokens_per_step * world),
                                             float(row[f"{g}_loss"]), float(row[f"{d}_loss"])))
    write_records(records, output)
    return records


def write_cmr_config(cfg: CPTConfig, fit: CMRFit | CMRSelection, prediction: CMRPrediction | SelectedCMRPrediction,
                     path: str | Path, records: str | Path) -> CPTConfig:
    """Set `data.replay_ratio` from a CMR prediction, record its provenance in `data.cmr` (shown on the model
    card), and write the config to `path` with a comment saying where the ratio came from. Returns the config."""
    budget_tokens = prediction.budget_tokens
    provenance = {"cmr": round(prediction.cmr, 4), "interval": [round(x, 4) for x in prediction.interval],
                  "budget_tokens": budget_tokens, "tolerance": fit.tolerance, "tolerance_mode": fit.tolerance_mode,
                  "records": str(records), "estimator": getattr(prediction, "estimator", "surfaces")}
    new = cfg.override({"data.replay_ratio": round(prediction.replay_ratio, 4), "data.cmr": provenance})
    header = (f"# replay_ratio from `hf-cpt cmr fit {records}` (CMR {prediction.cmr:.3f} at {budget_tokens:.3g} "
              f"tokens, tolerance {fit.tolerance} {fit.tolerance_mode})\n")
    write_yaml(new, path, header)
    return new
