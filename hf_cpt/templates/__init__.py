"""Per-domain YAML templates, shipped as package data and parsed into [`CPTConfig`]."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from ..config import CPTConfig


def list_templates() -> dict[str, str]:
    """Template names with their one-line descriptions."""
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[: -len(".yaml")]
            out[name] = load_template(name).description
    return out


def template_text(name: str) -> str:
    """The commented YAML of template `name`."""
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        names = [p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml")]
        hint = difflib.get_close_matches(name, names, n=1)
        raise ValueError(
            f"unknown template {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (available: {', '.join(sorted(names))})"
        )
    return path.read_text(encoding="utf-8")


def write_template(name: str, path: str | Path, force: bool = False) -> Path:
    """Write the commented YAML of template `name` to `path` (`hf-cpt init`), refusing to replace a file unless
    `force`; written to a temp file and renamed."""
    return write_text(template_text(name), path, force)


def domain_slug(domain: str) -> str:
    """`domain` as a file and directory name: lower case, runs of other characters as one '-'
    (`"Organic chemistry"` -> `"organic-chemistry"`)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-")


def custom_template_text(domain: str, train: str, eval: str, model: str = "embedded:smollm2-135m",
                         file: str = "CONFIG.yaml") -> str:
    """The commented YAML of a run on any domain (`hf-cpt init --domain NAME --train ... --eval ...`): the
    forgetting study's recipe with `domain` as the tag, `train` / `eval` as the domain's splits and `model` as the
    base; checked to parse into a valid [`CPTConfig`] before it is returned."""
    import re
    from string import Template

    from ..yaml_loader import load_yaml

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*", domain):
        raise ValueError(f"`--domain` {domain!r}: use letters, digits, '-', '_', '.' or spaces (it names the run)")
    for flag, value in (("--train", train), ("--eval", eval), ("--model", model)):
        if not value or any(c in value for c in "\n#'\"") or value.strip() != value:
            raise ValueError(f"`{flag}` {value!r}: give one path, glob, `embedded:` or `hub:` name, without quotes, "
                             "'#' or surrounding spaces")
    text = Template((resources.files(__name__) / "custom.yaml.in").read_text(encoding="utf-8")).substitute(
        domain=domain, train=train, eval=eval, model=model, file=file, slug=domain_slug(domain))
    CPTConfig.from_dict(load_yaml(text, source="the custom template")).check_held_out_sets()
    return text


def write_text(text: str, path: str | Path, force: bool = False) -> Path:
    """Write `text` to `path`, refusing to replace a file unless `force`; written to a temp file and renamed."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"`--output` {str(path)!r} exists; choose another path or pass --force")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_template(name: str) -> CPTConfig:
    """Parse template `name` into the same [`CPTConfig`] the Python API uses."""
    from ..yaml_loader import load_yaml

    return CPTConfig.from_dict(load_yaml(template_text(name), source=f"template {name!r}"))


# only configs that a test has run end to end (docs/distributed.md); DeepSpeed ZeRO-2/3 configs are not shipped
# since no test runs DeepSpeed
ACCELERATE_CONFIGS = ("fsdp",)


def accelerate_config(name: str) -> str:
    """Path of a shipped `accelerate launch --config_file` template: `fsdp` (FSDP2, full sharding)."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {name!r} (available: {', '.join(ACCELERATE_CONFIGS)})")
    return str(resources.files(__name__) / "accelerate" / f"{name}.yaml")
