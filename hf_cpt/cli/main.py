"""`hf-cpt`: continual pretraining from the command line.

    hf-cpt train --template quickstart          # run a shipped template
    hf-cpt train my_run.yaml -o runs/my_run     # run your own config
    hf-cpt init --domain medical                # write a commented template to edit
    hf-cpt templates                            # list the templates
"""

from __future__ import annotations

import functools
import sys
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

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError)


def _user_errors(fn):
    """Turn a bad-input exception into one clear line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"Error: {e}", err=True)
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
) -> None:
    """Continue pretraining a model on domain data with replay, and write the adapted checkpoint."""
    import dataclasses

    from ..config import CPTConfig
    from ..templates import load_template
    from ..train import run_cpt

    if config is not None and template is not None:
        raise ValueError("give either a CONFIG file or `--template NAME`, not both")
    if config is None and template is None:
        raise ValueError("give a CONFIG file or `--template NAME` (list them with `hf-cpt templates`)")
    cfg = CPTConfig.from_yaml(config) if config is not None else load_template(template)
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
    out = output_dir or cfg.output_dir or (f"runs/{template}" if template else f"runs/{config.stem}")
    result = run_cpt(cfg, output_dir=out, overwrite=overwrite)
    f = result.metrics["forgetting"]
    typer.echo(f"\nAdapted model written to {result.output_dir}")
    typer.echo(f"  domain  held-out loss: {f['domain_loss_start']:.4f} -> {f['domain_loss_end']:.4f} "
               f"({f['domain_delta']:+.4f})")
    typer.echo(f"  general held-out loss: {f['general_loss_start']:.4f} -> {f['general_loss_end']:.4f} "
               f"({f['general_delta']:+.4f}); tolerance breached: {f['tolerance_breached']}")
    typer.echo(f"  metrics: {result.output_dir / 'metrics.json'}  plot: {result.output_dir / 'forgetting.png'}")


@app.command()
@_user_errors
def init(
    domain: Annotated[str, typer.Option("--domain", "-d", help="Template to start from (see `hf-cpt templates`).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the YAML.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented YAML template for DOMAIN to edit, then run it with `hf-cpt train FILE`."""
    from ..templates import template_text

    text = template_text(domain)
    path = output or Path(f"hf-cpt-{domain}.yaml")
    if path.exists() and not force:
        raise FileExistsError(f"`--output` {str(path)!r} exists; choose another path or pass --force")
    path.write_text(text, encoding="utf-8")
    typer.echo(f"Wrote {path}. Edit it, then run: hf-cpt train {path}")


@app.command()
@_user_errors
def templates() -> None:
    """List the shipped templates."""
    from ..templates import list_templates

    items = list_templates()
    width = max(map(len, items))
    for name, description in items.items():
        typer.echo(f"{name:<{width}}  {description}")


def main() -> None:
    app(prog_name="hf-cpt")


if __name__ == "__main__":
    sys.exit(main())
