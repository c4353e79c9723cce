"""The technique registry: one entry per technique, and the one place the config, the recipe, the model card and
the exports learn which techniques exist.

In the spirit of peft's `PEFT_TYPE_TO_CONFIG_MAPPING` and composer's algorithm registry. Each technique module
declares its entry, ``TECHNIQUE = Technique(...)``: its YAML block, its config dataclass, the checks it needs on the
whole recipe, on the loaded model and on the launcher, what it adds to the `transformers.Trainer` (callbacks,
optimizer, loss), its model-card lines and its public names. [`TECHNIQUE_MODULES`] lists those modules, one line
each; [`techniques`] imports them on first use, so `import hf_cpt` stays light (this module imports only the
standard library).

Adding a technique is one module (config dataclass, pure core, thin Trainer glue, ``TECHNIQUE``) plus one line in
`TECHNIQUE_MODULES`; nothing else names it. docs/architecture.md walks through it.

Process-wide state: `TECHNIQUE_MODULES` is a plain list owned by this module; it changes only when a caller
appends a line (a plugin at import time, a test through ``monkeypatch``). Loaded entries are cached per module
name, so a removed line is forgotten with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover  (type names only: this module imports nothing of hf-cpt at run time)
    from .config import CPTConfig

# One line per technique: the module that declares its `TECHNIQUE`. The order is the order of everything the
# registry drives: validation, preflight, what each adds to the Trainer (the callbacks' order), the model card's
# recipe lines and the export groups.
TECHNIQUE_MODULES: list[str] = [
    "hf_cpt.mixers.replay",            # replay mixing             `data`
    "hf_cpt.callbacks.forgetting",     # forgetting monitor, KL    `monitor`
    "hf_cpt.prediction",               # plan check                `monitor.prediction`
    "hf_cpt.mixers.packing",           # document packing          `data.packing`
    "hf_cpt.mixers.prepared",          # data at scale             `data.prepared_dir`
    "hf_cpt.data_clean",               # data cleaning             `data.dedup`, `data.decontaminate`
    "hf_cpt.mixers.cmr",               # CMR scaling law           `data.cmr`
    "hf_cpt.dynamics",                 # CPT learning dynamics     (`hf-cpt plan`)
    "hf_cpt.callbacks.downstream",     # downstream evaluation     `downstream`
    "hf_cpt.callbacks.weight_averaging",  # weight averaging      `weight_averaging`
    "hf_cpt.callbacks.merge_base",     # merging with the base     `merge_base` (and `hf-cpt merge`)
    "hf_cpt.synth",                    # self-synthesised data     `data.synth`
    "hf_cpt.collators.distill_replay",        # distillation replay       `train.distill`
    "hf_cpt.liger",                    # memory: chunked loss      `train.chunked_loss`, `train.use_liger`
    "hf_cpt.adapters",                 # LoRA                      `lora` (after the loss: peft wraps the patched model)
    "hf_cpt.collators.masking",        # masking                   `masking`
    "hf_cpt.vocab.extend",             # vocabulary extension      `vocab`
    "hf_cpt.callbacks.active_forgetting",  # active forgetting     `active_forgetting`
    "hf_cpt.param_groups",             # weight decay groups, freezing  `train.decay_embeddings`, `train.freeze_layers`
    "hf_cpt.callbacks.rewarm",         # rewarming                 `schedule`
    "hf_cpt.hub",                      # Hub push                  `hub`
]


@dataclass
class TrainerParts:
    """What `build_trainer` is assembling, handed to each technique's `setup` hook: the run, its loaded model and
    data, and the callbacks and optimizers the Trainer will get (hooks append to `callbacks` and may set
    `optimizer_factory` / `scheduler_factory`, or ready-made `optimizers`, which FSDP refuses)."""

    cfg: CPTConfig
    args: Any
    model: Any
    tokenizer: Any
    data: Any
    vocab_summary: dict[str, Any] | None = None
    callbacks: list[Any] = field(default_factory=list)
    optimizers: tuple = (None, None)
    # or, built by the Trainer when it creates its own (after wrapping the model: the only way under FSDP, which
    # refuses `Trainer(optimizers=...)`): `optimizer_factory(model)` and `scheduler_factory(optimizer, steps)`
    optimizer_factory: Callable[[Any], Any] | None = None
    scheduler_factory: Callable[[Any, int], Any] | None = None
    # the names the Trainer's own optimizer decays (its `get_decay_parameter_names`), given the model it trains
    decay_parameter_names: Callable[[Any], list[str]] | None = None


@dataclass
class DataParts:
    """What `build_data` hands a technique's `collator` hook: the run, the model (still the base: no update yet), the
    tokenizer, how many training blocks the run reads, and `blocks()`, a fresh copy of that exact training stream
    (same mixer settings; each block with its `block_index` and `source_ids`)."""

    cfg: CPTConfig
    model: Any
    tokenizer: Any
    num_blocks: int
    blocks: Callable[[], Any]


@dataclass(frozen=True)
class Technique:
    """One technique's registry entry.

    Args:
        name: what the README and docs call it (`"active forgetting"`); the export group's name.
        key: the dotted path of its YAML block / `CPTConfig` attribute (`"active_forgetting"`, `"train.distill"`),
            or None for a tool configured by no block (the learning-dynamics planner). A top-level key that is
            not a declared `CPTConfig` field (a technique added outside hf-cpt) is a block of its own in the
            YAML and in `CPTConfig.to_dict()`.
        config: the block's dataclass (None when the block is plain data or there is none).
        exports: public name -> module (relative to `hf_cpt`) for `hf_cpt.<name>`.
        functional: pure core -> module, re-exported by `hf_cpt.functional`.
        enabled: whether a run uses it; default: its block is set.
        check: rules across blocks, run by `CPTConfig.__post_init__` for every technique (the hook looks at its
            own block first); raises `ValueError` naming the fields. Field checks stay in the config dataclass.
        unsharded: why it cannot run under FSDP/DeepSpeed (the recipe refuses such a launch before loading the
            model), or None.
        config_preflight: `(cfg, model_config, tokenizer)`: checks that need the model's config or tokenizer but
            no weights (a top-k above the vocabulary, a missing lexicon file, unknown lm-eval tasks); run once,
            with the recipe's other pre-checks, before any weights load, for enabled techniques.
        preflight: `(cfg, model, args)`: checks that need the loaded model or the launcher; run once, after the
            model is loaded and before any data is built or synthesised, for enabled techniques.
        block_sources: its collator reads each training block's `block_index` and `source_ids` (the mixer emits
            them, and the Trainer keeps those columns).
        collator: `(parts: DataParts) -> collator`: the data collator of a causal run (one technique at most);
            default: `transformers.default_data_collator`.
        setup: `(parts: TrainerParts)`: adds callbacks / optimizers / loss to the Trainer being built (enabled
            techniques only, in registry order); may return a function of the built Trainer, run once it exists.
        finish: `(cfg, trainer, directory)`: rewrites the saved model in the run's staging `directory` after training
            (e.g. merges a LoRA adapter into its base); called on every process, writes on the main one.
        card: `(config, metrics) -> lines`: the model card's recipe bullets, from `CPTConfig.to_dict()` and
            `metrics.json`; called for every technique (one that is off returns `[]` or describes the default).
        training_args: `TrainingArguments` settings the technique needs when enabled (e.g. a map-style data path
            lets the Trainer skip seen batches on resume: ``{"ignore_data_skip": False}``). Two enabled entries
            asking for different values of one setting is refused.

    Hooks that belong to the recipe layer (they consume the whole `CPTConfig` and the recipe's helpers, which a
    technique module may not import) are named as ``"module:function"`` strings, relative to `hf_cpt`, and
    resolved by [`Technique.hook`] when the recipe calls them:

        model: `(cfg, model, tokenizer) -> (model, tokenizer, summary)`: changes the loaded base model before
            anything else sees it (vocabulary extension); `summary` goes to `metrics.json` (one technique at most).
        data: `(cfg, model, tokenizer, args) -> RunData`: the technique owns the whole data side of the run (its
            own training set, held-out sets, collator and callbacks) instead of the token-exact mixer (masking;
            one technique at most).
        before_run: `(cfg, options) -> state`: on the main process, once the output directory is locked and
            before anything is written or loaded (e.g. the Hub checks the push token); `options` holds
            `run_cpt`'s keyword arguments meant for techniques (`hub_token`).
        after_run: `(cfg, output_dir, metrics, state)`: on the main process, once the output directory is
            complete (e.g. the Hub push); may add entries to `metrics`.
    """

    name: str
    key: str | None = None
    config: type | None = None
    exports: Mapping[str, str] = field(default_factory=dict)
    functional: Mapping[str, str] = field(default_factory=dict)
    enabled: Callable[[CPTConfig], bool] | None = None
    check: Callable[[CPTConfig], None] | None = None
    unsharded: str | None = None
    config_preflight: Callable[[CPTConfig, Any, Any], None] | None = None
    preflight: Callable[[CPTConfig, Any, Any], None] | None = None
    block_sources: bool = False
    collator: Callable[[DataParts], Any] | None = None
    setup: Callable[[TrainerParts], Callable[[Any], None] | None] | None = None
    finish: Callable[[CPTConfig, Any, Any], None] | None = None
    card: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None
    training_args: Mapping[str, Any] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None
    before_run: Callable[[CPTConfig, Mapping[str, Any]], Any] | str | None = None
    after_run: Callable[[CPTConfig, Any, dict[str, Any], Any], None] | str | None = None

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The hook `name` (`"model"`, `"data"`, `"before_run"`, `"after_run"`) as a callable: a
        ``"module:function"`` string is imported now (relative to `hf_cpt` for hf-cpt's own modules)."""
        value = getattr(self, name)
        if value is None or callable(value):
            return value
        module, _, function = value.partition(":")
        if not function:
            raise ValueError(f"registry entry {self.name!r}: `{name}` must be 'module:function', got {value!r}")
        return getattr(importlib.import_module(module_path(module)), function)

    def block(self, cfg: CPTConfig) -> Any:
        """This technique's block of `cfg` (None when unset or when it has no key)."""
        if self.key is None:
            return None
        return reduce(lambda obj, part: getattr(obj, part, None), self.key.split("."), cfg)

    def is_enabled(self, cfg: CPTConfig) -> bool:
        return self.enabled(cfg) if self.enabled is not None else self.block(cfg) is not None


_LOADED: dict[str, Technique] = {}  # module name -> its entry, filled on first use


def techniques() -> dict[str, Technique]:
    """Every registered technique by name, in `TECHNIQUE_MODULES` order (imports their modules on first use)."""
    out: dict[str, Technique] = {}
    for module in TECHNIQUE_MODULES:
        entry = _LOADED.get(module)
        if entry is None:
            entry = getattr(importlib.import_module(module), "TECHNIQUE", None)
            if not isinstance(entry, Technique):
                raise TypeError(f"{module} is listed in hf_cpt.registry.TECHNIQUE_MODULES but declares no "
                                "`TECHNIQUE = Technique(...)`")
            _LOADED[module] = entry
        if entry.name in out:
            raise ValueError(f"two registry entries are named {entry.name!r} ({module} and another)")
        out[entry.name] = entry
    return out


def enabled_techniques(cfg: CPTConfig) -> list[Technique]:
    """The techniques `cfg` uses, in registry order."""
    return [t for t in techniques().values() if t.is_enabled(cfg)]


def single_hook(cfg: CPTConfig, name: str) -> tuple[Technique, Callable[..., Any]] | None:
    """The one enabled technique that provides hook `name` (`"model"`, `"data"`) and the hook, or None. Two
    enabled techniques that each replace the same step cannot be combined: refused, naming both."""
    found = [t for t in enabled_techniques(cfg) if getattr(t, name) is not None]
    if len(found) > 1:
        raise ValueError(f"{' and '.join(f'`{t.key}`' for t in found)} each replace the run's {name} step; a run can "
                         "use one of them")
    return (found[0], found[0].hook(name)) if found else None


def merged_training_args(cfg: CPTConfig) -> dict[str, Any]:
    """The `TrainingArguments` settings the enabled techniques ask for, merged in registry order.

    Raises:
        ValueError: two enabled techniques ask for different values of one setting.
    """
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for t in enabled_techniques(cfg):
        for key, value in t.training_args.items():
            if key in out and out[key] != value:
                raise ValueError(f"`{owner[key]}` and `{t.key}` need different `{key}` ({out[key]!r} vs "
                                 f"{value!r}); a run cannot use both")
            out[key], owner[key] = value, t.key or t.name
    return out


def extension_techniques(declared: set[str]) -> dict[str, Technique]:
    """Entries whose block is a top-level YAML key that `CPTConfig` does not declare (techniques added outside
    hf-cpt), by key."""
    return {t.key: t for t in techniques().values() if t.key is not None and "." not in t.key
            and t.key not in declared}


def exports() -> dict[str, dict[str, str]]:
    """Export groups: technique name -> {public name: module relative to `hf_cpt`}."""
    return {t.name: dict(t.exports) for t in techniques().values() if t.exports}


def functional_cores() -> dict[str, str]:
    """Every pure core: name -> module relative to `hf_cpt` (what `hf_cpt.functional` re-exports)."""
    return {name: module for t in techniques().values() for name, module in t.functional.items()}


def names(module: str, *public: str) -> dict[str, str]:
    """``{name: module for name in public}``: the exports or cores one module contributes."""
    return {n: module for n in public}


def module_path(module: str) -> str:
    """The importable name of a module named in `exports` / `functional`: relative to `hf_cpt` for hf-cpt's own
    (`"callbacks.rewarm"` -> `"hf_cpt.callbacks.rewarm"`), as given for a technique outside the package."""
    import importlib.util

    if module.startswith("hf_cpt.") or importlib.util.find_spec(f"hf_cpt.{module.split('.')[0]}") is None:
        return module
    return f"hf_cpt.{module}"
