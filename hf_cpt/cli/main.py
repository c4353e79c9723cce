"""`hf-cpt`: continual pretraining from the command line.

    hf-cpt train --template quickstart          # run a shipped template
    hf-cpt train my_run.yaml -o runs/my_run     # run your own config
    hf-cpt prepare my_run.yaml                  # tokenize the corpora once into `data.prepared_dir`
    hf-cpt init --domain medical                # write a commented template to edit
    hf-cpt templates                            # list the templates
    hf-cpt cmr pilot my_run.yaml -o records.csv # pilot runs at several domain shares
    hf-cpt cmr fit records.csv --budget-tokens 2e9 --tolerance 0.05
    hf-cpt plan runs/pilot-* --budget-steps 4000 # fit the CPT learning-dynamics law, recommend a run
    hf-cpt eval runs/quickstart                 # the adapted model vs its base on lm-eval tasks
    hf-cpt merge runs/quickstart --alpha 0,0.5,1 -o runs/merged  # back towards the base, evaluated, one picked
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="hf-cpt",
    help="Continual pretraining of Hugging Face models without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _user_error_types() -> tuple[type[BaseException], ...]:
    """What bad input raises: a value the library refuses (`ValueError`, naming the field), a missing or existing
    file, a denied permission, a wrong type in a config (`ConfigTypeError`), a missing optional package
    (`MissingDependencyError`) and a full disk (`DiskFullError`). Any other exception (a bare `TypeError`,
    `ImportError`, `AttributeError`, ...) is
    a bug and keeps its traceback."""
    from ..import_utils import MissingDependencyError
    from ..utils import DiskFullError
    from ..validation import ConfigTypeError

    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, ConfigTypeError, MissingDependencyError,
            DiskFullError)


def _user_errors(fn):
    """Turn a bad-input exception into one clear line on stderr and exit status 2 (no traceback); let every other
    exception through with its traceback (a bug is never disguised as bad input)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_error_types() as e:
            # one line, whatever the message holds (a YAML excerpt, a third-party multi-line message)
            typer.echo("Error: " + " ".join(str(e).split()), err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@_user_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (from `hf-cpt init` or your own).")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Run a shipped template.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Overrides `output_dir`.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output dir once the run succeeds.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Overrides `train.max_steps`.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in <output_dir>.checkpoints.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes (DDP through torchrun; gloo on CPU, nccl on GPU).")] = 1,
) -> None:
    """Continue pretraining a model on domain data with replay, and write the adapted checkpoint."""
    if nproc < 1:
        raise ValueError(f"`--nproc` must be >= 1, got {nproc}")
    if nproc > 1:
        _relaunch_with_torchrun(nproc)
        return

    run: dict = {}  # what the interruption line reports: filled in as the run takes shape
    with _interruption_reported(run):
        from ..recipe import default_output_dir, load_config, run_cpt

        cfg = load_config(config, template)
        if max_steps is not None:
            cfg = cfg.override({"train.max_steps": max_steps})
        out = output_dir or default_output_dir(cfg, config, template)
        run.update(cfg=cfg, output_dir=out)
        result = run_cpt(cfg, output_dir=out, overwrite=overwrite, resume=resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    f = result.metrics["forgetting"]
    typer.echo(f"\nAdapted model written to {result.output_dir}")
    names = sorted({k[: -len("_loss_start")] for k in f if k.endswith("_loss_start") and f[k] is not None},
                   key=lambda n: (n == "domain", n))
    for name in names:
        kl = f.get(f"{name}_kl_end")
        typer.echo(f"  {name:<13} held-out loss: {f[f'{name}_loss_start']:.4f} -> {f[f'{name}_loss_end']:.4f} "
                   f"({f[f'{name}_delta']:+.4f})" + (f"; KL to base {kl:.4f}, top-1 agreement "
                                                     f"{f[f'{name}_top1_agree_end']:.1%}" if kl is not None else ""))
    from ..monitoring import describe_guard, forgetting_guards

    for guard in forgetting_guards(f):
        typer.echo(f"  guard: {describe_guard(guard)}")
    downstream = result.metrics.get("downstream") or {}
    from ..evaluation import format_change

    for key, end in (downstream.get("end") or {}).items():
        start = downstream["start"][key]
        change = format_change(end - start, (downstream.get("delta_stderr") or {}).get(key))
        typer.echo(f"  {key:<32} {start:.4f} -> {end:.4f} ({change})  [lm-eval, step 0 -> end]")
    typer.echo(f"  metrics: {result.output_dir / 'metrics.json'}  plot: {result.output_dir / 'forgetting.png'}")
    if result.metrics.get("hub_commit_url"):
        typer.echo(f"  pushed to the Hub: {result.metrics['hub_commit_url']}")
    if result.metrics.get("summary"):
        typer.echo(f"\n{result.metrics['summary']}")


@app.command("extend-vocab")
@_user_errors
def extend_vocab(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config with a `vocab:` block.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Use a shipped template.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where the extended model goes "
                                                       "(default: <output_dir>-base).")] = None,
    n_new_tokens: Annotated[Optional[int], typer.Option(help="Overrides `vocab.n_new_tokens`.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Overrides `vocab.init` (ofa, subword_mean, mean, random).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output dir.")] = False,
) -> None:
    """Learn domain subwords, merge them into the tokenizer and initialise their embeddings; write a stock
    checkpoint. (`hf-cpt train` does the same in memory when the config has a `vocab:` block.)"""
    from ..recipe import default_output_dir, extend_checkpoint, load_config

    cfg = load_config(config, template)
    changes = {f"vocab.{k}": v for k, v in (("n_new_tokens", n_new_tokens), ("init", init)) if v is not None}
    if changes:
        cfg = cfg.override(changes)  # builds a `vocab:` block from these when the config has none
    out = output_dir or default_output_dir(cfg, config, template, suffix="-base")
    s = extend_checkpoint(cfg, str(out), overwrite=overwrite)
    typer.echo(f"Extended model written to {out}: +{s['added']} tokens ({s['model_type']}), vocabulary "
               f"{s['old_vocab_size']} -> {s['new_vocab_size']}, rows {s['rows_before']} -> {s['rows_after']}, "
               f"init {s['init']}" + (f" (OFA coverage {s['ofa_coverage']:.0%})" if s.get("ofa_coverage") else ""))
    if s.get("fertility_before") is not None:
        typer.echo(f"  held-out domain fertility: {s['fertility_before']:.3f} -> {s['fertility_after']:.3f} "
                   "tokens/word")
    typer.echo(f"  examples: {', '.join(repr(x) for x in s['examples'][:10])}")
    typer.echo(f"  to train it: set `model.name_or_path: {out}` and remove the `vocab:` block")


@app.command()
@_user_errors
def prepare(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config whose `data:` sources are tokenized.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Use a shipped template.")] = None,
    prepared_dir: Annotated[Optional[Path], typer.Option(help="Overrides `data.prepared_dir`.")] = None,
    num_proc: Annotated[Optional[int], typer.Option(help="Overrides `data.num_proc` (tokenizing processes).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Rebuild a store prepared from other data or tokenizer.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Processes hashing documents for dedup and "
                                                          "decontamination (default: `data.num_proc`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the cleaning report (dedup, "
                                                            "decontamination) without writing the store.")] = False,
) -> None:
    """Tokenize the training corpora once into a pretokenized store (`data.prepared_dir`), which `hf-cpt train`
    then reads: no tokenizing during training, each rank builds only its own blocks, O(1) resume. The documents
    are deduplicated and decontaminated first (`data.dedup`, `data.decontaminate`); the report is in the store's
    manifest, and `--dry-run` prints it without writing anything."""
    from ..recipe import load_config, prepare_config

    cfg = load_config(config, template)
    if prepared_dir is not None:
        cfg = cfg.override({"data.prepared_dir": str(prepared_dir)})
    if dry_run:
        from ..recipe.cleaning import format_report

        report = prepare_config(cfg, num_proc=num_proc, workers=workers, dry_run=True)
        typer.echo(format_report(report) if report is not None else "data cleaning is off (`data.dedup` and "
                   "`data.decontaminate`): nothing would be removed")
        return
    out = prepare_config(cfg, num_proc=num_proc, overwrite=overwrite, workers=workers)
    from ..recipe.cleaning import store_cleaning_line

    line = store_cleaning_line(out)
    if line:
        typer.echo(line)
    typer.echo(f"Prepared store written to {out}; `hf-cpt train` reads it when `data.prepared_dir` points there")


@app.command()
@_user_errors
def push(
    output_dir: Annotated[Path, typer.Argument(help="Directory written by `hf-cpt train`.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="`user/name` or `org/name` (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created from main if missing).")] = None,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
) -> None:
    """Upload an adapted checkpoint with its model card (recipe + forgetting numbers) to the Hub.

    The token comes from `HF_TOKEN` or `hf auth login`; `HF_ENDPOINT` selects another Hub endpoint.
    """
    from ..hub import push_adapted

    url = push_adapted(output_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    typer.echo(f"Pushed {output_dir} to {repo_id}: {url}")


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same `hf-cpt train` command in `nproc` processes with torchrun (the engine the Trainer expects)."""
    import socket
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        argv.append(arg)
    with socket.socket() as s:  # a free port, so parallel runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", _TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "hf_cpt.cli.main", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # in its own session, so a Ctrl-C reaches torchrun once, relayed from here (see `_wait_relaying_signals`)
    code = _wait_relaying_signals(subprocess.Popen(cmd, env=env, start_new_session=True))
    if code:
        raise typer.Exit(code=code)


_RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# torchrun (`python -m torch.distributed.run`), except that once it has stopped its workers on a signal it exits
# 128 + the signal instead of printing a traceback after the main worker's line about what was kept
_TORCHRUN = ("import sys\nfrom torch.distributed.elastic.multiprocessing.api import SignalException\n"
             "from torch.distributed.run import main\ntry:\n    main()\n"
             "except SignalException as e:\n    sys.exit(128 + int(e.sigval))\n")


def _wait_relaying_signals(proc) -> int:
    """Wait for torchrun, passing on each SIGINT/SIGTERM/SIGHUP this process gets. torchrun stops its workers with
    the same signal and waits for them, so each cleans up and the main one says what was kept; killing torchrun
    instead (what `subprocess.call` does on Ctrl-C) would leave the workers training. Returns torchrun's exit
    status, or 128 + the first signal."""
    received: list[int] = []

    def relay(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, relay) for s in _RELAYED_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else code


@contextlib.contextmanager
def _interruption_reported(run: dict):
    """Turn SIGINT/SIGTERM into an exception for the duration, and when one stopped the run print one line: what
    was kept and the exact command to resume; then exit 128 + the signal (130, 143). Any exception after a
    signal counts as the interruption (a library may turn a KeyboardInterrupt into its own error)."""
    received: list[int] = []

    def interrupt(signum, frame):  # raised where the run is, so its cleanup runs (staging dir, lock, partial save)
        received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    installed = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, interrupt) for s in wanted} if installed else {}
    started = time.time()
    try:
        yield
    except BaseException as e:
        signum = received[0] if received else signal.SIGINT if isinstance(e, KeyboardInterrupt) else None
        if signum is None:
            raise
        # free the Trainer the finished frames hold: its progress bars close now, so the line below comes last
        traceback.clear_frames(e.__traceback__)
    else:
        return
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    gc.collect()
    if os.environ.get("RANK", "0") == "0":  # one line, from the main process
        typer.echo(_interruption_line(signal.Signals(signum).name, run, started), err=True)
    raise typer.Exit(code=128 + signum)


def _interruption_line(name: str, run: dict, started: float) -> str:
    """`Interrupted (SIGINT): kept ...; resume with: hf-cpt train ... --resume`, or why nothing was kept."""
    if "cfg" not in run:
        return f"Interrupted ({name}) before the run started: nothing was written"
    from ..recipe.train import checkpoint_dir, last_complete_checkpoint

    cfg, out = run["cfg"], Path(run["output_dir"])
    metrics = out / "metrics.json"
    if metrics.is_file() and metrics.stat().st_mtime >= started:
        return f"Interrupted ({name}) after the adapted model was written to {out}: nothing to resume"
    last = last_complete_checkpoint(checkpoint_dir(out)) if cfg.train.save_steps else None
    if last is not None:
        step = Path(last).name.rpartition("-")[2]
        return (f"Interrupted ({name}): kept checkpoint {last} (step {step} of {cfg.train.max_steps}); resume "
                f"with: {_train_command(resume=True)}")
    why = ("`train.save_steps` is 0, so the run writes no checkpoints" if not cfg.train.save_steps else
           f"stopped before the first checkpoint, at step {cfg.train.save_steps}")
    return f"Interrupted ({name}): nothing was kept ({why}); start again with: {_train_command(resume=False)}"


def _train_command(resume: bool) -> str:
    """This `hf-cpt train` command as the user typed it, with `--resume` added (or removed) and, under torchrun,
    `--nproc` (which the relaunch strips)."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume")]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not any(a == "--nproc" or a.startswith("--nproc=") for a in args):
        args += ["--nproc", str(world)]
    return shlex.join(["hf-cpt", *args, *(["--resume"] if resume else [])])


@app.command("eval")
@_user_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Directory written by `hf-cpt train`, a model directory or a Hub id.")],
    base: Annotated[Optional[str], typer.Option(help="Model to compare with (default: the run's base model).")]
    = None,
    tasks: Annotated[Optional[str], typer.Option(help="lm-eval tasks, comma-separated (default: the run's "
                                                      "`downstream.tasks`), e.g. hf_cpt_python_docs_mc,hf_cpt_kjv_mc.")]
    = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N documents per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples (default: each task's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Requests per forward pass (default 8).")] = None,
    include_path: Annotated[Optional[str], typer.Option(help="A directory of your own task YAMLs.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSON to write (default: "
                                                   "downstream_eval.json in MODEL when it is a directory).")] = None,
) -> None:
    """Score an adapted model and its base side by side on lm-eval tasks (task, metric, base, adapted, Δ)."""
    from ..recipe import compare_models

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    result = compare_models(model, base, names, include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                            batch_size=batch_size, output=output)
    typer.echo(f"base: {result.base or 'n/a'}\nadapted: {result.adapted}\n")
    typer.echo(result.table())
    typer.echo(f"\nwritten to {result.output}")


@app.command()
@_user_errors
def init(
    domain: Annotated[Optional[str], typer.Option(
        "--domain", "-d", help="A preset (see `hf-cpt templates`), or any name with --train and --eval.")] = None,
    train_path: Annotated[Optional[str], typer.Option(
        "--train", help="Your domain's training text: a file, directory, glob, `embedded:` or `hub:` name.")] = None,
    eval_path: Annotated[Optional[str], typer.Option(
        "--eval", help="Held-out text of the same domain, not in --train (a few hundred documents).")] = None,
    model: Annotated[str, typer.Option(help="Base model for a custom domain: local directory or Hub id.")]
        = "embedded:smollm2-135m",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the YAML.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented YAML config to edit, then run it with `hf-cpt train FILE`: a preset (`--domain medical`),
    or any domain from your own text (`--domain chemistry --train data/chem/*.jsonl --eval data/chem/val.jsonl`).
    With no option, list the presets."""
    from ..templates import custom_template_text, domain_slug, list_templates, write_template, write_text

    presets = list_templates()
    if domain is None:
        if train_path or eval_path:
            raise ValueError("`--domain` is required with --train/--eval: it names the run (e.g. --domain chemistry)")
        width = max(map(len, presets))
        typer.echo("Presets (hf-cpt init --domain NAME):")
        for name, description in presets.items():
            typer.echo(f"  {name:<{width}}  {description}")
        typer.echo("Any other domain: hf-cpt init --domain NAME --train PATH --eval PATH [--model ID]")
        return
    if train_path is None and eval_path is None and domain in presets:
        path = write_template(domain, output or Path(f"hf-cpt-{domain}.yaml"), force=force)
    else:
        if train_path is None:
            import difflib

            hint = difflib.get_close_matches(domain, list(presets), n=1)
            raise ValueError(f"`--domain` {domain!r} is not a preset" + (f" (did you mean {hint[0]!r}?)" if hint else
                             f" ({', '.join(presets)})") + ": for your own domain pass `--train PATH` (your text) "
                             "and `--eval PATH` (held-out text of it)")
        if eval_path is None:
            raise ValueError("`--eval` is needed with --train: a held-out file of your domain that is not in "
                             "--train (a few hundred documents; e.g. split off the last 5 % of your data). The "
                             "forgetting monitor measures the domain gain on it")
        for flag, value in (("--train", train_path), ("--eval", eval_path)):
            _check_local_data(flag, value)
        path = output or Path(f"hf-cpt-{domain_slug(domain)}.yaml")
        text = custom_template_text(domain, train_path, eval_path, model=model, file=str(path))
        path = write_text(text, path, force=force)
    typer.echo(f"Wrote {path}. Edit it, then run: hf-cpt train {path}")


def _check_local_data(flag: str, value: str) -> None:
    """A local path or glob given to `hf-cpt init` must match something now, not at training time."""
    import glob

    if value.startswith(("embedded:", "hub:")):
        return
    if not glob.glob(str(Path(value).expanduser())):
        raise ValueError(f"`{flag}` {value!r} matches no file or directory: give an existing path or glob (or an "
                         "`embedded:NAME/SPLIT` / `hub:ORG/NAME:SPLIT` name)")


@app.command()
@_user_errors
def templates() -> None:
    """List the shipped templates."""
    from ..templates import list_templates

    items = list_templates()
    width = max(map(len, items))
    for name, description in items.items():
        typer.echo(f"{name:<{width}}  {description}")


cmr_app = typer.Typer(help="Critical mixture ratio: pilot runs, then fit the scaling law and predict the ratio.",
                      no_args_is_help=True)
app.add_typer(cmr_app, name="cmr")


@cmr_app.command("pilot")
@_user_errors
def cmr_pilot(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config of the run to plan.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="Or a shipped template.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Records CSV to write.")] = Path("cmr_records.csv"),
    ratios: Annotated[str, typer.Option(help="Domain shares to try, comma-separated.")] = "0.25,0.5,0.75,1.0",
    budgets: Annotated[int, typer.Option(help="Evaluations per run (token budgets), evenly spaced.")] = 4,
    max_steps: Annotated[Optional[int], typer.Option(help="Steps per pilot run (overrides train.max_steps).")] = None,
) -> None:
    """Run short pilot trainings at several domain shares and write their held-out losses per token budget."""
    from ..recipe import load_config, run_cmr_pilot

    try:
        shares = [float(x) for x in ratios.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"`--ratios` must be comma-separated numbers, got {ratios!r}") from None
    cfg = load_config(config, template)
    records = run_cmr_pilot(cfg, shares, budgets, output, max_steps=max_steps)
    typer.echo(f"Wrote {len(records)} records to {output}. Next: hf-cpt cmr fit {output} --budget-tokens N "
               "--tolerance 0.05")


@cmr_app.command("fit")
@_user_errors
def cmr_fit(
    records: Annotated[Path, typer.Argument(help="Records CSV from `hf-cpt cmr pilot`.")],
    budget_tokens: Annotated[float, typer.Option(help="Training tokens of the planned run.")],
    tolerance: Annotated[float, typer.Option(help="Allowed rise of the general held-out loss.")] = 0.05,
    tolerance_mode: Annotated[str, typer.Option(help="relative (0.05 = 5%) or absolute (nats).")] = "relative",
    plot: Annotated[Path, typer.Option(help="PNG of the pilots, the chosen model's curves and the CMR.")] = Path(
        "cmr.png"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap refits for the interval.")] = 100,
    tokens_per_step: Annotated[Optional[float], typer.Option(
        help="The pilots' training tokens per update: with it the learning-dynamics law is a candidate too.")] = None,
    warmup_steps: Annotated[int, typer.Option(help="The pilots' LR warmup (updates), with --tokens-per-step.")] = 0,
    lr_before: Annotated[float, typer.Option(help="The checkpoint's final pretraining LR as a fraction of the "
                                                  "pilots' peak LR, with --tokens-per-step.")] = 0.0,
    output_json: Annotated[Optional[Path], typer.Option("--json", help="Write the selection (every candidate's "
                                                                      "score) and the prediction as JSON.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A run config to update with the predicted ratio.")] = None,
    write_config: Annotated[Optional[Path], typer.Option(help="Where to write the updated config.")] = None,
) -> None:
    """Choose the CMR estimator on the pilot records (leave-one-budget-out), predict the domain share (and replay
    ratio) for a budget with its interval."""
    from ..mixers.cmr import read_records
    from ..mixers.cmr_select import (PilotSchedule, format_selection, plot_selection, predict_selected_cmr,
                                     select_cmr_estimator, write_selection)

    if (config is None) != (write_config is None):
        raise ValueError("`--config` and `--write-config` go together: the config to update and where to write it")
    schedule = (PilotSchedule(tokens_per_step, warmup_steps, lr_before) if tokens_per_step is not None else None)
    selection = select_cmr_estimator(read_records(records), tolerance, tolerance_mode, schedule=schedule)
    pred = predict_selected_cmr(selection, budget_tokens, bootstrap=bootstrap)
    plot_selection(selection, pred, plot)
    for line in format_selection(selection):
        typer.echo(line)
    typer.echo(f"CMR at {budget_tokens:.3g} tokens: domain share {pred.cmr:.3f} "
               f"(90% interval {pred.interval[0]:.3f}-{pred.interval[1]:.3f})")
    typer.echo(f"  estimator {pred.estimator}, {pred.extrapolation:.3g}x the longest pilot budget (interval widened "
               f"by {pred.widening:.3f} for it)  -> data.replay_ratio: {pred.replay_ratio:.3f}    plot: {plot}")
    if output_json is not None:
        write_selection(selection, pred, output_json)
        typer.echo(f"  selection and prediction: {output_json}")
    if config is not None:
        from ..config import CPTConfig
        from ..recipe import write_cmr_config

        write_cmr_config(CPTConfig.from_yaml(config), selection, pred, write_config, records=records)
        typer.echo(f"Wrote {write_config}: hf-cpt train {write_config}")


def _floats(name: str, text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"`{name}` must be comma-separated numbers, got {text!r}") from None


@app.command()
@_user_errors
def plan(
    budget_steps: Annotated[int, typer.Option(help="Updates of the planned run (>= the longest pilot).")],
    runs: Annotated[Optional[list[Path]], typer.Argument(
        help="Pilot output directories of `hf-cpt train` (>= 2 schedules); none with --run.")] = None,
    tolerance: Annotated[float, typer.Option(help="Allowed rise of the general held-out loss at the end.")] = 0.05,
    tolerance_mode: Annotated[str, typer.Option(help="relative (0.05 = 5%) or absolute (nats).")] = "relative",
    schedules: Annotated[str, typer.Option(help="Candidate schedules, comma-separated.")] = "constant,cosine,wsd",
    peak_lrs: Annotated[Optional[str], typer.Option(help="Candidate peak LRs (default: the pilots').")] = None,
    replay_ratios: Annotated[Optional[str], typer.Option(help="Candidate replay ratios (default: 0.05 steps "
                                                               "within the pilots' range).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Candidates' warmup (default min(10, 10%)).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Refits on resampled pilot runs for the band.")] = 30,
    plot: Annotated[Path, typer.Option(help="PNG: pilots measured vs fitted, the plan with its band.")] = Path(
        "plan.png"),
    output_json: Annotated[Optional[Path], typer.Option("--json", help="Write the whole plan as JSON.")] = None,
    write_config: Annotated[Optional[Path], typer.Option(
        help="Write the recommended run's config, its predicted losses in `monitor.prediction` (checked by "
             "`hf-cpt train` at every evaluation).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="The config to plan, with --write-config (default: the "
                                                        "first pilot's recipe) or --run.")] = None,
    run: Annotated[bool, typer.Option(
        "--run", help="Train the pilots (constant and cosine at the config's replay ratio), plan, and train the "
                      "planned run into --output-dir.")] = False,
    template: Annotated[Optional[str], typer.Option("--template", "-t", help="With --run: a shipped template "
                                                                             "(default quickstart).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="With --run: the planned run's "
                                                                                  "directory.")] = None,
    pilot_steps: Annotated[Optional[int], typer.Option(help="With --run: updates per pilot (default 10% of the "
                                                            "budget, >= 8).")] = None,
    overwrite: Annotated[bool, typer.Option(help="With --run: replace a non-empty --output-dir.")] = False,
) -> None:
    """Fit the CPT learning-dynamics law to pilot runs and recommend a schedule, peak LR and replay ratio."""
    from ..prediction import summarize_prediction
    from ..recipe.plan import pilot_config, plan_cpt, plot_plan, write_plan, write_plan_config

    if config is not None and write_config is None and not run:
        raise ValueError("`--config` goes with `--write-config`: the config to plan and where to write the planned "
                         "one")
    options = dict(schedules=[s.strip() for s in schedules.split(",") if s.strip()],
                   peak_lrs=_floats("--peak-lrs", peak_lrs), replay_ratios=_floats("--replay-ratios", replay_ratios),
                   warmup_steps=warmup_steps, bootstrap=bootstrap)
    cfg = None  # the config planned with --run
    if run:
        if runs:
            raise ValueError("`--run` trains its own pilots: give a config (`--config` / `--template`), not pilot "
                             "runs")
        from ..recipe import default_output_dir, load_config
        from ..recipe.plan import run_plan

        template = template if template is not None or config is not None else "quickstart"
        cfg = load_config(config, template)
        out = output_dir or default_output_dir(cfg, config, template, "-planned")
        result, trained = run_plan(cfg, budget_steps, tolerance, out, pilot_steps=pilot_steps, overwrite=overwrite,
                                   tolerance_mode=tolerance_mode, **options)
    else:
        if not runs:
            raise ValueError("give pilot output directories of `hf-cpt train`, or `--run` to train them first")
        if template is not None or output_dir is not None or pilot_steps is not None or overwrite:
            raise ValueError("`--template`, `--output-dir`, `--pilot-steps` and `--overwrite` go with `--run`")
        result, trained = plan_cpt(runs, budget_steps, tolerance, tolerance_mode, **options), None
    plot_plan(result, plot)
    if output_json is not None:
        write_plan(result, output_json)
    f = result.fit
    typer.echo(f"fit on {len(f.pilots)} pilots ({', '.join(f.schedules)}; replay ratios "
               f"{', '.join(f'{1 - s:g}' for s in f.shares)}): rmse general {f.rmse_general:.4f}, domain "
               f"{f.rmse_domain:.4f} nats")
    if f.at_bounds:
        typer.echo(f"  warning: parameters at their bounds ({', '.join(f.at_bounds)}): the pilots pin them down "
                   "poorly; treat extrapolations with care")
    c = result.recommended
    if c is None:
        typer.echo(f"No candidate keeps the general loss within the tolerance (bound {result.general_bound:.4f}) at "
                   f"{budget_steps} steps: raise `--tolerance`, allow more replay, or a lower peak LR.")
    else:
        tokens = f" ({budget_steps * result.tokens_per_step:.3g} tokens)" if result.tokens_per_step else ""
        typer.echo(f"Plan for {budget_steps} steps{tokens}: schedule {c.schedule}, peak LR {c.peak_lr:g}, "
                   f"replay_ratio {c.replay_ratio:g}")
        typer.echo(f"  predicted general loss {c.general_end:.4f} (band top {c.general_hi:.4f}; bound "
                   f"{result.general_bound:.4f}), domain loss {c.domain_end:.4f} (band top {c.domain_hi:.4f}); "
                   f"{result.bootstrap_samples} bootstrap refits")
    pilot_updates = sum(len(p.lrs) for p in f.pilots)
    typer.echo(f"  pilot cost: {pilot_updates} updates, {pilot_updates / budget_steps:.0%} of the planned run's "
               f"{budget_steps}" + (f" ({pilot_updates * result.tokens_per_step:.3g} tokens)" if result.tokens_per_step
                                      else ""))
    typer.echo(f"  plot: {plot}" + (f"  plan: {output_json}" if output_json else ""))
    if write_config is not None:
        from ..config import CPTConfig

        base = (cfg if cfg is not None else CPTConfig.from_yaml(config) if config is not None
                else pilot_config(runs[0]))
        write_plan_config(result, base, write_config)
        typer.echo(f"Wrote {write_config} (predicted losses in `monitor.prediction`): hf-cpt train {write_config}")
    if trained is not None:
        check = trained.metrics["forgetting"].get("prediction") or {}
        typer.echo(f"Planned run in {trained.output_dir}: {summarize_prediction(check) if check else 'not checked'}")


# --- hf-cpt merge (issue 33): one command, the logic is in hf_cpt.recipe.merge_run --------------------------------------
@app.command()
@_user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Directory written by `hf-cpt train`, any safetensors model "
                                                 "directory, or a PEFT LoRA adapter directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the merged checkpoint goes.")],
    alpha: Annotated[str, typer.Option(help="0: the base, 1: the adapted model; a comma-separated list sweeps "
                                            "(each evaluated on the run's held-out sets), e.g. 0,0.25,0.5,0.75,1.")],
    base: Annotated[Optional[str], typer.Option(help="Base model: a directory, Hub id or embedded:... (default: "
                                                     "the one the run records).")] = None,
    pick: Annotated[Optional[str], typer.Option(help="For a sweep: knee (default), kl<=X (lowest domain loss with "
                                                     "KL to base at most X) or alpha=A.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="hf-cpt YAML with the held-out sets for a sweep (default: "
                                                        "the run's hf_cpt_config.yaml).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Merge an adapted model with its base, base + alpha x (adapted - base), streaming tensor by tensor."""
    from ..recipe.merge_run import merge_with_base

    alphas = _floats("--alpha", alpha) or []
    result = merge_with_base(run_dir, alphas if len(alphas) != 1 else alphas[0], output, base=base, pick=pick,
                             config=config, overwrite=overwrite)
    if result.sweep:
        typer.echo(result.table())
        typer.echo(f"\npicked alpha {result.alpha:g} ({result.record['sweep']['pick']}); table: "
                   f"{result.output_dir / 'merge_sweep.json'}  plot: {result.output_dir / 'merge_sweep.png'}")
    r = result.record
    extra = (f"; {r['lora_modules']} LoRA modules merged" if r["kind"] == "lora" else "") + (
        f"; new-token rows of {', '.join(r['extended_rows'])} from the adapted model" if r.get("extended_rows") else "")
    typer.echo(f"Merged model (alpha {result.alpha:g}, base {r['base']}) written to {result.output_dir}{extra}")


# --- hf-cpt study (issue 33): defences x seeds on any config; the logic is in hf_cpt.recipe.study ---------------------
@app.command()
@_user_errors
def study(
    configs: Annotated[list[Path], typer.Argument(help="hf-cpt YAML configs (one per domain); drawn on shared axes.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where runs, study.json and study.png go.")],
    defences: Annotated[str, typer.Option(help="Comma-separated: naive (always run, the reference), rewarm, "
                                               "replay, self_replay, distill, average, lora, freeze, merge (the naive run merged with "
                                               "its base at 4 alphas), merge:NAME (defence NAME's run merged).")] =
        "naive,rewarm,self_replay,distill,merge",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (train.seed and data.shuffle_seed).")] = "0",
    steps: Annotated[Optional[int], typer.Option(help="Override `train.max_steps` of every config.")] = None,
) -> None:
    """Run forgetting defences x seeds on your configs; print the table, the Pareto front and a verdict."""
    from ..recipe.study import run_study, study_table

    seed_list = [int(x) for x in _floats("--seeds", seeds) or []]
    result = run_study(configs, [d.strip() for d in defences.split(",") if d.strip()], seed_list, out, steps=steps,
                       log=typer.echo)
    typer.echo("\n" + study_table(result.summary) + "\n")
    for line in result.verdict:
        typer.echo(line)
    typer.echo(f"plot: {result.plot}  table: {out / 'study.json'}")


def main() -> None:
    import logging

    # hf-cpt says what it did (loss choice, synthesised text, distillation targets) in one line each, on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("hf-cpt: %(message)s"))
    package_logger = logging.getLogger("hf_cpt")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    # bitsandbytes (imported by peft/transformers when installed) warns on import that a 4-bit CPU kernel is
    # missing; hf-cpt never runs 4-bit matmuls, and its 8-bit optimizers work without that kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    _plain_output_when_redirected()
    app(prog_name="hf-cpt")


def _plain_output_when_redirected(stream=None) -> bool:
    """With stderr going to a file or a pipe, turn tqdm's progress bars off (`TQDM_DISABLE=1`: the Trainer's,
    datasets', lm-eval's), so the log holds lines, not carriage returns and cursor-up escape codes from nested
    bars; the Trainer still prints its logged metrics every `logging_steps`. A `TQDM_DISABLE` the user set wins.
    Returns whether the bars were turned off."""
    stream = sys.stderr if stream is None else stream
    if "TQDM_DISABLE" in os.environ or getattr(stream, "isatty", lambda: False)():
        return False
    os.environ["TQDM_DISABLE"] = "1"
    return True


if __name__ == "__main__":
    sys.exit(main())
