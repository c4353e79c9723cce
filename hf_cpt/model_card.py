"""Model card for an adapted checkpoint: the recipe that made it and how much it forgot."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .monitoring import describe_guard, forgetting_guards
from .plotting import format_history_table

CARD_TAGS = ["continual-pretraining", "hf-cpt"]


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _hub_dataset(source: dict[str, Any] | None) -> str | None:
    """`hub:org/name:split` corpora are Hub datasets worth linking in the metadata; local files are not."""
    train = (source or {}).get("train") or ""
    return train[4:].split(":")[0] if train.startswith("hub:") else None


def _domain_tag(config: dict[str, Any]) -> str | None:
    domain = config.get("domain") or ""
    tag = re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-")
    return tag or None


def forgetting_table(f: dict[str, Any]) -> str:
    """Markdown table of every held-out set: loss before/after and its change, and the KL to the base model and
    top-1 agreement at the end where they were measured."""
    names = sorted({k[: -len("_loss_start")] for k in f if k.endswith("_loss_start")},
                   key=lambda n: (n != "general", n == "domain", n))
    labels = {"general": "general (upstream)", "domain": "domain (downstream)",
              "general_self": "general_self (text the base model wrote)"}
    rows = ["| held-out set | loss before | loss after | change | KL to base (end) | top-1 agreement (end) |",
            "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        rows.append(f"| {labels.get(n, n)} | {_fmt(f.get(f'{n}_loss_start'))} | {_fmt(f.get(f'{n}_loss_end'))} | "
                    f"{_fmt(f.get(f'{n}_delta'), '+.4f')} ({_fmt(f.get(f'{n}_delta_rel'), '+.2%')}) | "
                    f"{_fmt(f.get(f'{n}_kl_end'))} | {_fmt(f.get(f'{n}_top1_agree_end'), '.2%')} |")
    return "\n".join(rows)


def guard_table(f: dict[str, Any]) -> str:
    """Markdown table of the forgetting monitor's guards: per held-out set, the bound that applies, the value at
    the end and whether it was breached (and the sentence `describe_guard` writes for it)."""
    rows = ["| guarded set | metric | bound | end | breached | guard |", "|---|---|---:|---:|---|---|"]
    for g in forgetting_guards(f):
        name, metric = g.get("guarded_set"), g.get("tolerance_metric")
        end = g.get("end", f.get(f"{name}_{metric}_end" if metric == "kl" else f"{name}_loss_end"))
        breached = (f"yes, first at step {g.get('breach_step')}" if g.get("tolerance_breached") else "no")
        rows.append(f"| {name} | {'KL to base' if metric == 'kl' else 'loss'} | {_fmt(g.get('tolerance_bound'))} | "
                    f"{_fmt(end)} | {breached} | {describe_guard(g)} |")
    return "\n".join(rows) if len(rows) > 2 else "No guard on forgetting."


def prediction_section(f: dict[str, Any]) -> str:
    """The card's "Predicted vs measured" section: per evaluation the planned run's predicted loss, its band and the
    measurement on the general and domain sets (`metrics.json` `forgetting.prediction`); empty without a
    prediction."""
    from .prediction import summarize_prediction

    p = f.get("prediction")
    if not p:
        return ""

    def cells(e: dict[str, Any], role: str) -> list[str]:
        if f"{role}_predicted" not in e:
            return ["", ""]
        mark = "" if e[f"{role}_inside"] else " **outside**"
        return [f"{e[f'{role}_predicted']:.4f} ({e[f'{role}_lo']:.4f}-{e[f'{role}_hi']:.4f})",
                f"{e[f'{role}_measured']:.4f}{mark}"]

    rows = [f"| step | {p['general_set']} predicted (band) | measured | {p['domain_set']} predicted (band) | "
            "measured |",
            "|---:|---:|---:|---:|---:|"]
    rows += ["| " + " | ".join([str(e["step"]), *cells(e, "general"), *cells(e, "domain")]) + " |"
             for e in p["evals"]]
    band = f" Band: {p['band']}." if p.get("band") else ""
    source = f" Prediction: {p['source']}." if p.get("source") else ""
    return (f"\n### Predicted vs measured\n\nThe run was planned (`monitor.prediction`): "
            f"{summarize_prediction(p)}.{band}{source}\n\n" + "\n".join(rows) + "\n")


def _summary_line(metrics: dict[str, Any]) -> str:
    return f"\n**Summary.** {metrics['summary']}\n" if metrics.get("summary") else ""


def downstream_table(d: dict[str, Any]) -> str:
    """Markdown table of the downstream (lm-eval) scores: before (step 0), after, change, each ± its standard
    error where lm-eval computed one; a change inside its 95 % interval is marked as noise."""
    from .evaluation import format_change

    def score(value: Any, err: Any) -> str:
        return _fmt(value) + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")

    rows = ["| task / metric | before | after | change (95 % interval) |", "|---|---:|---:|---:|"]
    for key, end in (d.get("end") or {}).items():
        start = (d.get("start") or {}).get(key)
        change = "n/a" if start is None else format_change(end - start, (d.get("delta_stderr") or {}).get(key))
        rows.append(f"| {key} | {score(start, (d.get('start_stderr') or {}).get(key))} | "
                    f"{score(end, (d.get('end_stderr') or {}).get(key))} | {change} |")
    return "\n".join(rows)


def downstream_eval_results(d: dict[str, Any], pipeline_tag: str) -> list[Any]:
    """The adapted model's downstream scores as Hub `model-index` entries (one per task and metric)."""
    from huggingface_hub import EvalResult

    out = []
    for key, value in (d.get("end") or {}).items():
        task, metric = key.split("/", 1)
        out.append(EvalResult(task_type=pipeline_tag, dataset_type=task, dataset_name=task,
                              metric_type=metric.split("/")[0], metric_value=value,
                              metric_name=f"{metric} (lm-eval" + (f", limit {d['limit']}" if d.get("limit") else "")
                              + (f", {d['num_fewshot']}-shot" if d.get("num_fewshot") is not None else "") + ")"))
    return out


def recipe_lines(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """One bullet per technique the run used, in the words a reader of the card needs: each registered
    technique's `card` lines, in registry order (see `hf_cpt.registry`)."""
    from .registry import techniques

    return [line for t in techniques().values() if t.card is not None for line in t.card(config, metrics)]


def render_model_card(config: dict[str, Any], metrics: dict[str, Any], base_model: str | None = None,
                      repo_id: str | None = None) -> str:
    """Markdown (with Hub metadata) describing the run.

    The YAML metadata carries `base_model`, `datasets` (Hub corpora only), `tags`
    (`continual-pretraining`, `hf-cpt`, the domain), `library_name` and an `hf_cpt` block with the held-out losses
    before and after, so tools can read the forgetting numbers without parsing the body; with downstream
    evaluation, the final task scores as `model-index` results and before/after/change in `hf_cpt.downstream`.

    Args:
        config: the resolved run config (`CPTConfig.to_dict()`).
        metrics: the run's `metrics.json` content.
        base_model: Hub id of the starting model; defaults to `metrics["base_model"]`.
        repo_id: where the card is pushed, used in the usage snippet.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = base_model or metrics.get("base_model")
    f = metrics.get("forgetting", {})
    tokens = metrics.get("train_tokens", {})
    datasets = [d for d in (_hub_dataset(config.get("data", {}).get(k)) for k in ("domain", "general")) if d]
    tags = CARD_TAGS + [t for t in [_domain_tag(config)] if t]
    numbers = {k: f.get(k) for k in ("general_loss_start", "general_loss_end", "general_delta_rel",
                                      "domain_loss_start", "domain_loss_end", "domain_delta_rel",
                                      "tolerance_breached")}
    # per guard: the set, what it watches, its bound and whether it held
    numbers["guards"] = [{k: g.get(k) for k in ("guarded_set", "tolerance_metric", "tolerance", "tolerance_mode",
                                                "tolerance_bound", "tolerance_breached", "breach_step")}
                         for g in forgetting_guards(f)]
    if f.get("prediction"):  # the plan check: evaluations inside the predicted band, per set
        numbers["prediction"] = {k: f["prediction"].get(k) for k in ("general_inside", "general_checked",
                                                                     "domain_inside", "domain_checked", "left_band")}
    # every other held-out set (e.g. general_self) and the KL to the base model
    numbers.update({k: v for k, v in f.items() if k not in numbers and v is not None
                    and k.endswith(("_loss_start", "_loss_end", "_delta_rel", "_kl_end", "_top1_agree_end"))})
    pipeline_tag = "fill-mask" if config.get("objective") == "mlm" else "text-generation"
    model_name = config["model"]["name_or_path"]
    downstream = metrics.get("downstream") or {}
    hf_cpt = {"forgetting": numbers, "train_tokens": tokens, "global_step": metrics.get("global_step")}
    if downstream.get("end"):
        hf_cpt["downstream"] = {k: {"before": downstream["start"].get(k), "after": v,
                                    "change": v - downstream["start"].get(k, v)} for k, v in downstream["end"].items()}
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        datasets=datasets or None,
        tags=tags,
        pipeline_tag=pipeline_tag,
        model_name=(repo_id or f"{base_model or model_name}-cpt") if downstream.get("end") else None,
        eval_results=downstream_eval_results(downstream, pipeline_tag) or None,
        hf_cpt=hf_cpt,
    )
    recipe = "\n".join(f"- {line}" for line in recipe_lines(config, metrics))
    auto = "AutoModelForMaskedLM" if config.get("objective") == "mlm" else "AutoModelForCausalLM"
    usage = (f"\n## Use\n\n```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
             f"model = {auto}.from_pretrained(\"{repo_id}\")\n"
             f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n```\n") if repo_id else ""
    body = f"""
# Continually pretrained from `{base_model or model_name}`

This checkpoint was adapted with [hf-cpt](https://github.com/hf-cpt/hf-cpt) by continual pretraining on domain
text mixed with general (replay) text. {config.get('description') or ''}
{usage}
## Forgetting

{forgetting_table(f)}

{guard_table(f)}
{prediction_section(f)}{_summary_line(metrics)}

![forgetting plot](forgetting.png)

{format_history_table(metrics.get('eval_history', []))}
{_downstream_section(downstream)}
## Recipe

{recipe}
- updates: {metrics.get('global_step')}, final training loss: {_fmt(metrics.get('train_loss'))}, \
wall time: {_fmt(metrics.get('train_runtime_s'), '.1f')} s, training tokens: {sum(tokens.values()):,}

<details><summary>Full hf-cpt config</summary>

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```

</details>
"""
    # ModelCard parses the metadata block back, so the card is valid for the Hub as written
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def _downstream_section(d: dict[str, Any]) -> str:
    if not d.get("end"):
        return ""
    how = ", ".join(x for x in (f"first {d['limit']} documents per task" if d.get("limit") else "all documents",
                                f"{d['num_fewshot']}-shot" if d.get("num_fewshot") is not None else "")
                    if x)
    guard = ""
    if d.get("tolerance_metric"):
        guard = (f"\nTolerance on `{d['tolerance_metric']}`: {d['tolerance']} ({d['tolerance_mode']}); breached: "
                 + (f"yes, first at step {d['breach_step']}" if d.get("tolerance_breached") else "no") + ".\n")
    return (f"\n## Downstream evaluation\n\nlm-evaluation-harness on the model during training ({how}): at step "
            f"0 (the base model) and after the last update.\n\n{downstream_table(d)}\n{guard}")
