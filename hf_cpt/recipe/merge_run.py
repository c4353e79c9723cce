"""`hf-cpt merge`: an adapted run merged back towards its base, `base + alpha * (adapted - base)`, written as a
normal checkpoint; with several alphas, each is evaluated on the run's held-out sets and one is picked.

The public function is [`merge_with_base`]; the CLI only calls it and prints. The weights stream through
[`hf_cpt.merge`] / [`hf_cpt.merge_lora`] (a few tensors in memory); this module resolves the base, copies the config and tokenizer, writes
`hf_cpt_merge.json` and the model card section, and for a sweep rebuilds the run's held-out sets from its
recorded config and measures each alpha the way training did: the Trainer's held-out loss and
[`evaluate_kl`] against base top-k targets ([`KLToBaseCallback.compute_targets`]), plus lm-eval tasks when the
run has a `downstream` block.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, CPTConfig, ModelConfig
from ..merge import check_alpha, merge_checkpoints
from ..merge_lora import ADAPTER_CONFIG, merge_lora_checkpoint
from ..merge_sweep import parse_pick, pick_row, plot_merge_sweep, sweep_table
from ..utils import commit_staging_dir, make_staging_dir

logger = logging.getLogger(__name__)

MERGE_RECORD = "hf_cpt_merge.json"
SWEEP_FILE = "merge_sweep.json"
SWEEP_PLOT = "merge_sweep.png"
VOCAB_FILE = "hf_cpt_vocab.json"
# what a merged checkpoint carries over besides the weights (the run's metrics describe the adapted model)
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
          "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
          CONFIG_FILE, VOCAB_FILE, "forgetting.png")


@dataclass
class MergeResult:
    """What [`merge_with_base`] wrote: the merged checkpoint, its alpha, and the sweep when there was one."""

    output_dir: Path
    alpha: float
    record: dict[str, Any]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    picked: int | None = None

    def table(self) -> str:
        return sweep_table(self.sweep, self.picked)


def resolve_merge_base(run_dir: str | Path, base: str | None = None) -> tuple[str, str]:
    """`(name, local directory)` of the base to merge with: `base` (a directory, Hub id or `embedded:...`), else
    the adapter's `base_model_name_or_path`, the run's `model.name_or_path` or `metrics.json`'s `model`.

    Raises:
        ValueError: no base given and the run records none.
    """
    run = Path(run_dir).expanduser()
    if base is None:
        base = _recorded_base(run)
    if base is None:
        raise ValueError(f"`base` is not set and {str(run)!r} records no base model (no {CONFIG_FILE}, "
                         f"{ADAPTER_CONFIG} or metrics.json): pass it (CLI: --base DIR_OR_HUB_ID)")
    return base, _local_checkpoint(base)


def _recorded_base(run: Path) -> str | None:
    if (run / ADAPTER_CONFIG).is_file():
        return json.loads((run / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if (run / CONFIG_FILE).is_file():
        return CPTConfig.from_pretrained(run).model.name_or_path
    if (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("model")
    return None


def _local_checkpoint(name: str) -> str:
    """A local directory holding `name`'s safetensors weights (a Hub id is downloaded: weights and JSON only)."""
    from .models import resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])


def merge_with_base(run_dir: str | Path, alpha: float | Sequence[float], output_dir: str | Path, *,
                    base: str | None = None, pick: str | None = None, config: str | Path | None = None,
                    overwrite: bool = False) -> MergeResult:
    """Merge an adapted model (an `hf-cpt train` output, any safetensors checkpoint, or a PEFT LoRA adapter
    directory) with its base and write the result to `output_dir`, atomically.

    Args:
        run_dir: the adapted model. A LoRA adapter is merged into the base first (at strength alpha).
        alpha: one value, or several to sweep: each is evaluated on the run's held-out sets (domain loss, KL to
            the base on each general set, downstream tasks if configured) and one is picked.
        output_dir: where the merged checkpoint goes (with `hf_cpt_merge.json`; a sweep adds `merge_sweep.json`
            and `merge_sweep.png`).
        base: the base model; default: the one the run records.
        pick: for a sweep, `knee` (default), `kl<=X` (lowest domain loss with KL at most X on every general set)
            or `alpha=A`.
        config: an hf-cpt YAML whose held-out sets the sweep uses; default: the run's `hf_cpt_config.yaml`.
        overwrite: replace a non-empty `output_dir` once the new one is complete.

    Returns:
        a [`MergeResult`]; `.table()` is the sweep table the CLI prints.
    """
    alphas = [check_alpha(a) for a in (alpha if isinstance(alpha, Sequence) else [alpha])]
    if not alphas:
        raise ValueError("`alpha` must give at least one value")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"`alpha` lists a value twice: {alphas}")
    if pick is not None:
        if len(alphas) == 1:
            raise ValueError("`pick` chooses among several alphas: give a list (CLI: --alpha 0,0.25,0.5,0.75,1)")
        parse_pick(pick)
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise FileNotFoundError(f"`run_dir` {str(run_dir)!r} is not a directory")
    base_name, base_dir = resolve_merge_base(run, base)
    final = Path(output_dir).expanduser().resolve()
    if final == run.resolve():
        raise ValueError("`output_dir` is the run directory itself: write the merge elsewhere")
    tmp = make_staging_dir(final, overwrite)
    try:
        sweep, picked = ([], None) if len(alphas) == 1 else \
            _sweep(run, base_dir, alphas, pick or "knee", tmp, config)
        chosen = alphas[0] if picked is None else sweep[picked]["alpha"]
        summary = write_merged(run, base_dir, chosen, tmp)
        record = {"alpha": chosen, "base": base_name, "adapted": str(run.resolve()), **summary,
                  "formula": "base + alpha * (adapted - base)"}
        if sweep:
            record["sweep"] = {"alphas": alphas, "pick": pick or "knee", "file": SWEEP_FILE, "plot": SWEEP_PLOT}
            (tmp / SWEEP_FILE).write_text(json.dumps({"rows": sweep, "picked": picked, "pick": pick or "knee"},
                                                     indent=2), encoding="utf-8")
            plot_merge_sweep(sweep, tmp / SWEEP_PLOT, picked, title=f"hf-cpt merge: {run.name}")
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _write_card(run, tmp, record, sweep, picked)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_staging_dir(tmp, final)
    return MergeResult(output_dir=final, alpha=chosen, record=record, sweep=sweep, picked=picked)


def write_merged(run: Path, base_dir: str, alpha: float, out: Path) -> dict[str, Any]:
    """Write the weights of one merge into `out` with the run's config and tokenizer; return the summary."""
    if (run / ADAPTER_CONFIG).is_file():
        summary = merge_lora_checkpoint(base_dir, run, out, alpha)
        _copy_files(Path(base_dir), out)
        _copy_files(run, out, skip=("config.json",))  # the adapter's tokenizer, when it saved one
        if summary.tied:  # a saved copy of a tied head: the merged model unties it, as peft's merge does
            cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
            cfg["tie_word_embeddings"] = False
            (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    else:
        new_rows = _new_rows_from(run)
        summary = merge_checkpoints(base_dir, run, out, alpha, new_rows_from=new_rows)
        _copy_files(run, out)
    record = summary.to_dict()
    if (run / VOCAB_FILE).is_file():
        record["new_rows_from"] = _new_rows_from(run)
    return record


def _new_rows_from(run: Path) -> int | None:
    """The first new-token row of a vocabulary-extended run (`hf_cpt_vocab.json`): from there on rows come from
    the adapted model, also where new tokens took padding rows the base already had."""
    path = run / VOCAB_FILE
    return json.loads(path.read_text(encoding="utf-8")).get("old_vocab_size") if path.is_file() else None


def _copy_files(src: Path, dst: Path, skip: Sequence[str] = ()) -> None:
    for name in COPIED:
        if name not in skip and (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --- the sweep ------------------------------------------------------------------------------------------------------
def _sweep(run: Path, base_dir: str, alphas: list[float], pick: str, tmp: Path,
           config: str | Path | None) -> tuple[list[dict[str, Any]], int]:
    """Merge and evaluate every alpha (one merged model on disk and in memory at a time); pick one."""
    cfg = _sweep_config(run, config)
    work = tmp / ".sweep"
    work.mkdir()
    try:
        reference = work / "alpha-0"
        reference.mkdir()
        write_merged(run, base_dir, 0.0, reference)  # the base (with the run's new rows, if any): KL targets
        model, tokenizer = _load(reference, cfg)
        evaluator = HeldOutEvaluator(cfg, tokenizer, model)
        del model
        rows = []
        for alpha in alphas:
            candidate = work / f"alpha-{alpha:g}"
            if alpha != 0.0:
                candidate.mkdir()
                write_merged(run, base_dir, alpha, candidate)
            model, _ = _load(reference if alpha == 0.0 else candidate, cfg)
            rows.append({"alpha": alpha, **evaluator.evaluate(model)})
            logger.info("merge sweep: alpha %g: domain loss %.4f, KL %.4f", alpha, rows[-1]["domain_loss"],
                        rows[-1]["kl"])
            del model
            gc.collect()
            if alpha != 0.0:
                shutil.rmtree(candidate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, pick_row(rows, pick)


def _sweep_config(run: Path, config: str | Path | None) -> CPTConfig:
    if config is not None:
        cfg = CPTConfig.from_yaml(config)
    elif (run / CONFIG_FILE).is_file():
        cfg = CPTConfig.from_pretrained(run)
    else:
        raise ValueError(f"a sweep evaluates each alpha on the run's held-out sets, but {str(run)!r} has no "
                         f"{CONFIG_FILE}: pass `config` (CLI: --config RUN.yaml) naming `data.domain.eval` and "
                         "`data.general.eval`")
    if cfg.objective != "clm" or cfg.masking is not None:
        raise ValueError("a merge sweep evaluates causal-LM runs only (`objective: clm`, no `masking`): merge one "
                         "alpha, or evaluate the merged models yourself")
    cfg.check_held_out_sets()
    return cfg


def _load(directory: Path, cfg: CPTConfig) -> tuple[Any, Any]:
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(directory), dtype=cfg.model.dtype))
    if not any(p.device.type != "cpu" for p in model.parameters()):
        import torch

        if torch.cuda.is_available():
            model.cuda()
    return model, tokenizer


class HeldOutEvaluator:
    """The run's held-out sets rebuilt from its config, measured as training measured them: the Trainer's
    held-out loss on each set, KL(base || model) and top-1 agreement on each general set (targets from
    `reference`, the base), and the run's lm-eval tasks when it has a `downstream` block.

    The self-synthesised set (`general_self`) is not rebuilt (it would mean sampling the base again)."""

    def __init__(self, cfg: CPTConfig, tokenizer: Any, reference: Any) -> None:
        from ..callbacks.kl_to_base import KLToBaseCallback
        from .data import build_eval_sets

        self.cfg, self.tokenizer = cfg, tokenizer
        self.sets = build_eval_sets(cfg.data, tokenizer)
        self.domain = cfg.monitor.domain
        general = {n: s for n, s in self.sets.items() if n in cfg.general_sets()}
        self.kl = KLToBaseCallback(general, top_k=min(cfg.monitor.kl_top_k, reference.get_output_embeddings()
                                                      .weight.shape[0]),
                                   batch_size=cfg.train.per_device_eval_batch_size)
        self.kl.compute_targets(reference)

    def evaluate(self, model: Any) -> dict[str, Any]:
        """`{"domain_loss", "kl" (max over general sets), "<set>_loss", "<set>_kl", "<set>_top1_agree", ...}`."""
        from ..base_targets import evaluate_kl

        losses = self._losses(model)
        row: dict[str, Any] = {"domain_loss": losses[self.domain], "kl": 0.0}
        for name in self.kl.inputs:
            t = self.kl.targets[name]
            result = evaluate_kl(model, self.kl.inputs[name], t["ids"], t["logprobs"],
                                 batch_size=self.kl.batch_size, attention_mask=self.kl.masks[name],
                                 position_ids=self.kl.positions[name])
            row.update({f"{name}_loss": losses[name], f"{name}_kl": result["kl"],
                        f"{name}_top1_agree": result["top1_agree"]})
            row["kl"] = max(row["kl"], result["kl"])
        if self.cfg.downstream is not None:
            from ..evaluation import evaluate_tasks, flatten_results

            d = self.cfg.downstream
            results = evaluate_tasks(model, self.tokenizer, d.tasks, include_path=d.include_path, limit=d.limit,
                                     num_fewshot=d.num_fewshot, batch_size=d.batch_size)
            row.update(flatten_results(results, d.metrics))
        return row

    def _losses(self, model: Any) -> dict[str, float]:
        """Each set's held-out loss from `Trainer.evaluate`, as the forgetting monitor reads it in training."""
        import tempfile

        from transformers import Trainer, TrainingArguments, default_data_collator

        if self.cfg.data.packing == "documents":
            from ..mixers.packing import DocumentMaskingGuard

            DocumentMaskingGuard.attach(model)  # packed documents stay apart, as in `build_trainer`
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=self.cfg.train.
                                     per_device_eval_batch_size, report_to="none", prediction_loss_only=True,
                                     remove_unused_columns=True, dataloader_pin_memory=False)
            trainer = Trainer(model=model, args=args, data_collator=default_data_collator)
            metrics = trainer.evaluate(eval_dataset=self.sets)
        return {name: float(metrics[f"eval_{name}_loss"]) for name in self.sets}


# --- the model card -------------------------------------------------------------------------------------------------
def _write_card(run: Path, out: Path, record: dict[str, Any], sweep: list[dict[str, Any]],
                picked: int | None) -> None:
    """The run's model card with a "Merged with the base" section appended (no card: none written)."""
    card = run / "README.md"
    if not card.is_file():
        return
    lines = [
        "", "## Merged with the base", "",
        f"These weights are `base + alpha x (adapted - base)` with **alpha = {record['alpha']:g}** "
        f"(`hf-cpt merge`, {record['kind']} merge): base `{record['base']}`; alpha 0 is the base, 1 the adapted "
        "model described above (whose numbers above are for alpha 1)."
        + (" Rows of new tokens come from the adapted model." if record.get("extended_rows")
           or record.get("new_rows_from") is not None else ""),
    ]
    if sweep:
        lines += ["", f"Alphas evaluated on the run's held-out sets (picked by `{record['sweep']['pick']}`; "
                      f"KL = max over the general sets, nats/token):", "",
                  "| alpha | domain loss | KL to base | |", "|---:|---:|---:|---|"]
        lines += [f"| {r['alpha']:g} | {r['domain_loss']:.4f} | {r['kl']:.4f} | {'picked' if i == picked else ''} |"
                  for i, r in enumerate(sweep)]
        lines += ["", f"![merge sweep]({SWEEP_PLOT})"]
    text = card.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    (out / "README.md").write_text(text, encoding="utf-8")
