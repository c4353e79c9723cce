"""A forgetting study on any config: defences x seeds, drawn on shared axes with the Pareto front, and a verdict.

[`run_study`] (CLI: `hf-cpt study CONFIG [CONFIG ...] --defences naive,rewarm,distill,merge --seeds 0,1,2`) trains
every defence of [`DEFENCES`] on each config with each seed (`train.seed` and `data.shuffle_seed`), merges the
naive run with its base at several alphas when `merge` is asked for (any trained defence's run with `merge:NAME`,
e.g. `merge:distill`: a combination that costs no more training), and scores every run on the config's own
held-out sets:

    domain gain   = domain loss at step 0 - domain loss at the end        (`monitor.domain`)
    KL to base    = the largest KL(base || model) over the general sets   (every `kind: general` set)
    general Δ     = general loss at the end - at step 0                   (`monitor.general`)

A defence is on the Pareto front when no other defence (seed means) has both a larger domain gain and a lower KL
(or general Δ). The verdict checks the goal "at least `reduction` less KL than naive CPT at `gain` of its domain
gain" per config, with the seed spread. Replay defences run 1 / (1 - ratio) times the updates, so every run sees
the same domain tokens. Every run's `metrics.json` is kept under `out`, so a rerun only re-draws.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callbacks.progress import training_bar_label
from ..config import CPTConfig
from ..merge_sweep import pareto_front

REPLAY = 0.25
MERGE_ALPHAS = (0.25, 0.5, 0.75, 0.9)
SHIPS_UNMONITORED = ("average",)  # their output is not the live model the monitor evaluated
_OFF = {"data.replay_ratio": 0.0, "data.replay_stages": [], "schedule": None, "train.distill": None, "lora": None,
        "weight_averaging": None, "train.freeze_layers": 0, "merge_base": None}  # merges: `merge`, `merge:NAME`


def _rewarm(cfg: CPTConfig) -> dict[str, Any]:
    steps = cfg.train.max_steps
    return {**_OFF, "train.warmup_steps": 0, "train.lr_scheduler_type": None,  # the schedule block sets the LR
            "schedule": {"schedule": "rewarm", "warmup_steps": max(1, steps // 10), "decay": "cosine",
                         "min_lr_ratio": 0.1}}


def _replayed(cfg: CPTConfig, changes: dict[str, Any]) -> dict[str, Any]:
    steps = round(cfg.train.max_steps / (1 - REPLAY))  # the same domain tokens as the runs without replay
    schedule = {**changes["schedule"], "warmup_steps": max(1, steps // 10)}
    return {**changes, "data.replay_ratio": REPLAY, "train.max_steps": steps, "schedule": schedule}


def _replay(cfg: CPTConfig) -> dict[str, Any]:
    if cfg.data.general is None or cfg.data.general.train == "self":
        raise ValueError("`--defences replay` replays `data.general.train`, which this config does not set: use "
                         "`self_replay` (text the base model writes) or add `data.general`")
    return _replayed(cfg, _rewarm(cfg))


def _self_replay(cfg: CPTConfig) -> dict[str, Any]:
    general = {"train": "self", "eval": cfg.data.general.eval if cfg.data.general is not None else None}
    return {**_replayed(cfg, _rewarm(cfg)), "data.general": general, "data.synth.train_tokens": 4096}


def _distill(cfg: CPTConfig) -> dict[str, Any]:
    return {**_self_replay(cfg), "train.distill": {"weight": 1.0, "tokens": "replay", "top_k": 64}}


def _freeze(cfg: CPTConfig) -> dict[str, Any]:
    from transformers import AutoConfig

    from .models import resolve_model_path

    layers = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path)).num_hidden_layers
    return {**_rewarm(cfg), "train.freeze_layers": max(1, layers // 4)}  # the bottom quarter


def _average(cfg: CPTConfig) -> dict[str, Any]:
    every = max(1, cfg.train.max_steps // 20)
    return {**_rewarm(cfg), "weight_averaging": {"method": "ema", "decay": 0.9, "every": every, "ship": True}}


# name -> overrides of the config; `merge` is no training run: the naive run merged with its base
DEFENCES: dict[str, Callable[[CPTConfig], dict[str, Any]]] = {
    "naive": lambda cfg: {**_OFF, "train.lr_scheduler_type": "constant", "train.warmup_steps": 0},
    "rewarm": _rewarm,
    "replay": _replay,
    "self_replay": _self_replay,
    "distill": _distill,
    "average": _average,
    "lora": lambda cfg: {**_rewarm(cfg), "lora": {"r": 16, "alpha": 32}},
    "freeze": _freeze,
    "merge": lambda cfg: {},
}


@dataclass
class StudyResult:
    """What [`run_study`] measured: one row per run (`config`, `defence`, `seed`, `domain_gain`, `kl`,
    `general_delta`), the per-config summary with its front, and the verdict lines."""

    rows: list[dict[str, Any]]
    summary: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    verdict: list[str] = field(default_factory=list)
    plot: Path | None = None


def _merged_defence(name: str) -> str | None:
    """The trained defence a merge entry merges with its base: `merge` -> `naive`, `merge:distill` -> `distill`;
    None for a trained defence."""
    if name == "merge":
        return "naive"
    head, sep, run = name.partition(":")
    return run if head == "merge" and sep else None


def check_defences(defences: Sequence[str]) -> list[str]:
    """The defences in run order, naive (the reference) first; `merge:X` (the run of defence X merged with its base
    at every alpha) adds X when it is not listed."""
    unknown = [d for d in defences if d not in DEFENCES and _merged_defence(d) not in set(DEFENCES) - {"merge"}]
    if unknown or not defences:
        raise ValueError(f"`defences`: unknown {unknown or 'none given'}; choose from {', '.join(DEFENCES)}, or "
                         "merge:DEFENCE (a trained defence merged with the base)")
    named = [*defences, *[m for d in defences if (m := _merged_defence(d)) is not None]]
    return ["naive", *[d for d in dict.fromkeys(named) if d != "naive"]]


def score_run(cfg: CPTConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Domain gain, the largest KL to the base over the general sets, and the guarded general set's Δ loss."""
    f = metrics["forgetting"]
    kls = [f[f"{n}_kl_end"] for n in cfg.general_sets() if f.get(f"{n}_kl_end") is not None]
    return {"domain_gain": -f[f"{cfg.monitor.domain}_delta"], "kl": max(kls) if kls else math.nan,
            "general_delta": f[f"{cfg.monitor.general}_delta"]}


def _merge_rows(cfg: CPTConfig, run_dir: Path, metrics: dict[str, Any], out: Path,
                alphas: Sequence[float] = MERGE_ALPHAS, label: str = "merge") -> list[dict[str, Any]]:
    """The run merged with its base at each alpha (`hf-cpt merge --alpha ...`), each scored on the held-out sets
    after training, against the run's step-0 losses."""
    from .merge_run import merge_with_base

    cached = out / "merge_sweep.json"
    if not cached.is_file():
        merge_with_base(run_dir, list(alphas), out, overwrite=True)
    sweep = json.loads(cached.read_text(encoding="utf-8"))["rows"]
    f, g = metrics["forgetting"], cfg.monitor.general
    return [{"defence": f"{label} {r['alpha']:g}", "domain_gain": f[f"{cfg.monitor.domain}_loss_start"] -
             r["domain_loss"], "kl": r["kl"], "general_delta": r[f"{g}_loss"] - f[f"{g}_loss_start"]}
            for r in sweep]


def _shipped_score(cfg: CPTConfig, run_dir: Path, metrics: dict[str, Any], out: Path) -> dict[str, Any]:
    """A run that ships weights the monitor never evaluated (the weight average) scored after training: its
    alpha = 1 merge is the shipped model itself, measured like the merge sweep (KL to the base included)."""
    row = next(r for r in _merge_rows(cfg, run_dir, metrics, out, (0.5, 1.0)) if r["defence"] == "merge 1")
    return {k: row[k] for k in ("domain_gain", "kl", "general_delta")}


def run_config(cfg: CPTConfig, name: str, defences: Sequence[str], seeds: Sequence[int], out: Path,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every defence x seed on one config (each run cached as `out/<defence>/seed<k>/metrics.json`)."""
    from .train import run_cpt

    cfg.check_held_out_sets()
    rows = []
    for seed in seeds:
        seeded = cfg.override({"train.seed": seed, "data.shuffle_seed": seed})
        merged = {m for d in defences if (m := _merged_defence(d)) is not None}
        for defence in defences:
            if _merged_defence(defence) is not None:  # no training: a trained run's sweep, below
                continue
            run_dir = out / defence / f"seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                with training_bar_label(f"{name} {defence} seed {seed}"):
                    run_cpt(seeded.override(DEFENCES[defence](seeded)), output_dir=run_dir, overwrite=True)
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            score = _shipped_score(seeded, run_dir, metrics, out / "shipped" / defence / f"seed{seed}") \
                if defence in SHIPS_UNMONITORED else score_run(seeded, metrics)
            rows.append({"config": name, "defence": defence, "seed": seed, **score})
            log(f"{name} {defence} seed {seed}: domain gain {rows[-1]['domain_gain']:.4f}, KL {rows[-1]['kl']:.4f}")
            if defence in merged:  # `merge` rows for the naive run, `distill+merge A` for `merge:distill`
                where, label = ("merge", "merge") if defence == "naive" else (f"merge-{defence}",
                                                                              f"{defence}+merge")
                for r in _merge_rows(seeded, run_dir, metrics, out / where / f"seed{seed}", label=label):
                    rows.append({"config": name, "seed": seed, **r})
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per config: each defence's seed mean and spread (sample std), its KL reduction and gain kept against naive
    CPT, and whether it is on the front (domain gain vs KL, and vs general Δ)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        summary = []
        for defence in dict.fromkeys(r["defence"] for r in mine):
            runs = [r for r in mine if r["defence"] == defence]
            s: dict[str, Any] = {"defence": defence, "seeds": len(runs)}
            for key in ("domain_gain", "kl", "general_delta"):
                values = [r[key] for r in runs]
                s[key] = statistics.fmean(values)
                s[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(s)
        naive = summary[0]
        for s in summary:
            s["kl_reduction"] = 1 - s["kl"] / naive["kl"] if naive["kl"] else math.nan
            s["gain_kept"] = s["domain_gain"] / naive["domain_gain"] if naive["domain_gain"] else math.nan
            s["neg_gain"] = -s["domain_gain"]
        for x, flag in (("kl", "front_kl"), ("general_delta", "front_general")):
            front = set(pareto_front(summary, x=x, y="neg_gain"))
            for i, s in enumerate(summary):
                s[flag] = i in front
        out[config] = summary
    return out


def verdicts(summary: dict[str, list[dict[str, Any]]], reduction: float = 0.5, gain: float = 0.9) -> list[str]:
    """One line per config: the defences on the front, and the goal met or missed by how much."""
    lines = []
    for config, rows in summary.items():
        front = [s["defence"] for s in rows if s["front_kl"]]
        eligible = [s for s in rows[1:] if s["gain_kept"] >= gain]
        best = max(eligible, key=lambda s: s["kl_reduction"], default=None)
        head = f"{config}: front (domain gain vs KL) {', '.join(front)}"
        if best is None:
            top = max(rows[1:], key=lambda s: s["gain_kept"], default=None)
            lines.append(f"{head}; goal MISSED: no defence keeps >= {gain:.0%} of the domain gain"
                         + (f" (best {top['defence']}: {top['gain_kept']:.0%})" if top else ""))
            continue
        met = best["kl_reduction"] >= reduction
        lines.append(f"{head}; goal {'MET' if met else 'MISSED'}: {best['defence']} cuts KL to base by "
                     f"{best['kl_reduction']:.0%} (goal >= {reduction:.0%}"
                     + ("" if met else f", short by {reduction - best['kl_reduction']:.0%}")
                     + f") keeping {best['gain_kept']:.0%} of the domain gain; seeds {best['seeds']}, KL "
                     f"{best['kl']:.4f} ± {best['kl_std']:.4f}")
    return lines


def plot_study(summary: dict[str, list[dict[str, Any]]], rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One row of two panels per config (domain gain vs KL to base, vs general Δ), on axes shared across configs;
    seeds as dots, means as larger markers with their spread, the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plotting import save_figure

    fig, axes = plt.subplots(len(summary), 2, figsize=(11, 4 * len(summary)), sharex="col", sharey=True,
                             squeeze=False, constrained_layout=True)
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    colors = {d: plt.get_cmap("tab20")(i % 20) for i, d in enumerate(defences)}
    for (config, stats), pair in zip(summary.items(), axes):
        for ax, x, flag, label in ((pair[0], "kl", "front_kl", "KL(base ‖ model), max over general sets"),
                                   (pair[1], "general_delta", "front_general", "Δ general loss (guarded set)")):
            for r in (r for r in rows if r["config"] == config):
                ax.scatter(r[x], r["domain_gain"], color=colors[r["defence"]], s=12, alpha=0.5)
            for s in stats:
                ax.errorbar(s[x], s["domain_gain"], xerr=s[f"{x}_std"], yerr=s["domain_gain_std"], fmt="o",
                            ms=8, color=colors[s["defence"]], label=s["defence"])
            front = sorted((s for s in stats if s[flag]), key=lambda s: s[x])
            ax.plot([s[x] for s in front], [s["domain_gain"] for s in front], "k--", lw=1, label="Pareto front")
            ax.set_xlabel(label)
            ax.set_ylabel("domain gain (nats/token)")
            ax.set_title(config)
            ax.grid(alpha=0.3)
        pair[0].legend(fontsize=7)
    return save_figure(fig, path)


def run_study(configs: Sequence[str | Path], defences: Sequence[str], seeds: Sequence[int], out: str | Path,
              steps: int | None = None, log: Callable[[str], None] = print) -> StudyResult:
    """Run defences x seeds on each config (YAML paths), write `study.json` and `study.png` into `out`, and return
    the rows, the summary and the verdict (see the module docstring)."""
    defences = check_defences(defences)
    if not seeds:
        raise ValueError("`seeds` must list at least one seed")
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for path in configs:
        cfg = CPTConfig.from_yaml(path)
        if steps is not None:
            cfg = cfg.override({"train.max_steps": steps})
        cfg = cfg.override({"monitor.action": "none"})  # a study measures forgetting, it never stops a run
        name = Path(path).stem
        rows += run_config(cfg, name, defences, seeds, out / name, log)
    summary = summarise(rows)
    result = StudyResult(rows, summary, verdicts(summary))
    result.plot = plot_study(summary, rows, out / "study.png")
    tmp = out / ".study.json.tmp"
    tmp.write_text(json.dumps({"rows": rows, "summary": summary, "verdict": result.verdict}, indent=1),
                   encoding="utf-8")
    tmp.replace(out / "study.json")
    return result


def study_table(summary: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: per config and defence, seed means ± spread and the front flags."""
    lines = ["| config | defence | seeds | domain gain | KL to base | Δ general loss | KL cut vs naive | gain kept "
             "| front |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for config, stats in summary.items():
        for s in stats:
            front = "/".join(k for k, f in (("KL", "front_kl"), ("general", "front_general")) if s[f]) or ""
            lines.append(f"| {config} | {s['defence']} | {s['seeds']} | {s['domain_gain']:.4f} ± "
                         f"{s['domain_gain_std']:.4f} | {s['kl']:.4f} ± {s['kl_std']:.4f} | {s['general_delta']:+.4f}"
                         f" | {s['kl_reduction']:.0%} | {s['gain_kept']:.0%} | {front} |")
    return "\n".join(lines)
