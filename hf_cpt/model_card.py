"""Model card for an adapted checkpoint: the recipe that made it and how much it forgot."""

from __future__ import annotations

from typing import Any

import yaml

from .plotting import format_history_table


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_model_card(config: dict[str, Any], metrics: dict[str, Any], base_model: str | None = None) -> str:
    """Markdown (with Hub metadata) describing the run.

    Args:
        config: the resolved run config (`CPTConfig.to_dict()`).
        metrics: the run's `metrics.json` content.
        base_model: Hub id of the starting model, recorded as `base_model` metadata when known.
    """
    from huggingface_hub import ModelCard, ModelCardData

    f = metrics.get("forgetting", {})
    tokens = metrics.get("train_tokens", {})
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        tags=["hf-cpt", "continual-pretraining", "domain-adaptation"],
        pipeline_tag="text-generation",
    )
    model_name = config["model"]["name_or_path"]
    body = f"""
# Continually pretrained from `{model_name}`

This checkpoint was adapted with [hf-cpt](https://github.com/hf-cpt/hf-cpt) by continual pretraining on domain
text mixed with general (replay) text. {config.get('description') or ''}

## Forgetting

| held-out set | loss at step 0 | loss at the end | change |
|---|---:|---:|---:|
| general (upstream) | {_fmt(f.get('general_loss_start'))} | {_fmt(f.get('general_loss_end'))} | {_fmt(f.get('general_delta'), '+.4f')} ({_fmt(f.get('general_delta_rel'), '+.2%')}) |
| domain (downstream) | {_fmt(f.get('domain_loss_start'))} | {_fmt(f.get('domain_loss_end'))} | {_fmt(f.get('domain_delta'), '+.4f')} ({_fmt(f.get('domain_delta_rel'), '+.2%')}) |

General-loss tolerance: {f.get('tolerance')} ({f.get('tolerance_mode')}); breached: \
{'yes, first at step ' + str(f['breach_step']) if f.get('tolerance_breached') else 'no'}.

![forgetting plot](forgetting.png)

{format_history_table(metrics.get('eval_history', []))}

## Training

- updates: {metrics.get('global_step')}, training tokens: {sum(tokens.values()):,}
  ({', '.join(f'{k}: {v:,}' for k, v in tokens.items())})
- final training loss: {_fmt(metrics.get('train_loss'))}
- wall time: {_fmt(metrics.get('train_runtime_s'), '.1f')} s

## Recipe

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```
"""
    # ModelCard parses the metadata block back, so the card is valid for the Hub as written
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))
