"""A toy technique, written the way a real one is (docs/architecture.md, "Adding a technique"): a config dataclass, a
pure core, thin Trainer glue and one registry entry. tests/test_registry.py adds its module to
`hf_cpt.registry.TECHNIQUE_MODULES` (the one registry line) and checks that it is configured, validated, trained,
carded and exported with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hf_cpt.registry import Technique, TrainerParts, names
from hf_cpt.validation import check_int

if TYPE_CHECKING:
    from hf_cpt.config import CPTConfig

MODULE = "tests.toy_technique"
CALLS: dict[str, list[Any]] = {"preflight": [], "attached": [], "model": [], "before_run": [], "after_run": []}  # what the hooks saw, for the test to read


@dataclass
class ToyConfig:
    """Count every `every`-th optimizer update (the YAML block `toy:`)."""

    every: int = field(default=1, metadata={"help": "Count every N-th update."})

    def __post_init__(self) -> None:
        check_int("every", self.every)


def count_updates(step: int, every: int) -> int:
    """How many counted updates `step` optimizer updates make (pure core)."""
    return step // every


class ToyCallback(TrainerCallback):
    """Logs `toy_count`, the counted updates so far."""

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count = count_updates(state.global_step, self.config.every)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["toy_count"] = self.count
        return control


def _check(cfg: CPTConfig) -> None:
    if cfg.toy is not None and cfg.toy.every > cfg.train.max_steps:
        raise ValueError(f"`toy.every` ({cfg.toy.every}) is longer than the run (`train.max_steps`="
                         f"{cfg.train.max_steps})")


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    CALLS["preflight"].append(type(model).__name__)


def _setup(parts: TrainerParts) -> Any:
    parts.callbacks.append(ToyCallback(parts.cfg.toy))
    return CALLS["attached"].append


def adapt_model(cfg: CPTConfig, model: Any, tokenizer: Any) -> tuple[Any, Any, None]:
    """The `model` hook (named as "module:function", as recipe-layer hooks are): sees the base model first."""
    CALLS["model"].append(type(model).__name__)
    return model, tokenizer, None


def _before_run(cfg: CPTConfig, options: dict[str, Any]) -> str:
    CALLS["before_run"].append(sorted(options))
    return "state from before_run"


def _after_run(cfg: CPTConfig, output_dir: Any, metrics: dict[str, Any], state: str) -> None:
    CALLS["after_run"].append((output_dir.is_dir(), state))
    metrics["toy_after_run"] = state


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    toy = config.get("toy")
    return [f"toy: every {toy['every']}-th update counted"] if toy else []


TECHNIQUE = Technique(
    name="toy",
    key="toy",
    config=ToyConfig,
    exports=names(MODULE, "ToyConfig", "ToyCallback"),
    functional=names(MODULE, "count_updates"),
    check=_check,
    preflight=_preflight,
    setup=_setup,
    card=_card,
    training_args={"logging_nan_inf_filter": False},
    model=f"{MODULE}:adapt_model",
    before_run=_before_run,
    after_run=_after_run,
)
