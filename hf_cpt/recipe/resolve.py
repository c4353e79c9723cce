"""Which config a command runs and where it writes: one rule for `train`, `extend-vocab` and the CMR pilot."""

from __future__ import annotations

from pathlib import Path

from ..config import CPTConfig
from ..templates import load_template


def load_config(config: str | Path | None = None, template: str | None = None) -> CPTConfig:
    """The config from a YAML file or a shipped template (exactly one of them)."""
    if config is not None and template is not None:
        raise ValueError("give either a CONFIG file or `--template NAME`, not both")
    if config is None and template is None:
        raise ValueError("give a CONFIG file or `--template NAME` (list them with `hf-cpt templates`)")
    return CPTConfig.from_yaml(config) if config is not None else load_template(template)


def default_output_dir(cfg: CPTConfig, config: str | Path | None = None, template: str | None = None,
                       suffix: str = "") -> Path:
    """`output_dir` from the config, else `runs/<template>` or `runs/<config file stem>`, plus `suffix`."""
    base = cfg.output_dir or (f"runs/{template}" if template else f"runs/{Path(config).stem}" if config
                              else "runs/model")
    return Path(f"{base}{suffix}")
