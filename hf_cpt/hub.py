"""Pushing an adapted checkpoint to the Hugging Face Hub (or any Hub-API endpoint) with its model card.

`push_adapted(output_dir, repo_id)` uploads what `hf-cpt train` wrote (safetensors weights, config, tokenizer,
`hf_cpt_config.yaml`, `metrics.json`, `forgetting.png`) in one commit, with a `README.md` model card regenerated
from the recorded recipe and metrics. The token comes from the standard `huggingface_hub` sources (`HF_TOKEN`, then
the `hf auth login` cache) unless passed explicitly; it is never printed, logged or written anywhere by hf-cpt.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .registry import Technique, names

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

logger = logging.getLogger(__name__)

# What an adapted checkpoint consists of. Pickles (`*.bin`, `*.pt`, `training_args.bin`) are never uploaded.
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.txt", "vocab.json", "merges.txt", "*.model", "added_tokens.json", "hf_cpt_config.yaml",
                   "metrics.json", "forgetting.png", "hf_cpt_vocab.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


@dataclass
class HubConfig:
    """Where `hf-cpt train` pushes the adapted model when `push_to_hub` is true (or what `hf-cpt push` defaults to)."""

    push_to_hub: bool = field(default=False, metadata={"help": "Push the adapted model when training succeeds."})
    repo_id: str | None = field(default=None, metadata={"help": "`user/name` or `org/name` on the Hub."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (existing repos keep theirs)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})

    def __post_init__(self) -> None:
        if self.repo_id is not None:
            check_repo_id(self.repo_id)
        if self.push_to_hub and not self.repo_id:
            raise ValueError("`push_to_hub` is true but `repo_id` is not set: add `hub.repo_id: user/name`")


def check_repo_id(repo_id: Any) -> str:
    """`user/name` with Hub-legal characters, or a ValueError naming `repo_id`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"`repo_id` must look like `user/name` or `org/name`, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"`repo_id` {repo_id!r} is not a valid Hub repo id: {e}") from None
    return repo_id


def _files_to_upload(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()
             and any(fnmatch.fnmatch(p.name, pat) for pat in UPLOAD_PATTERNS)]
    if not any(p.name == "config.json" for p in files) or not any(p.suffix == ".safetensors" for p in files):
        pickles = [p.name for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, x) for x in PICKLE_PATTERNS)]
        raise ValueError(
            f"`output_dir` {str(folder)!r} is not an adapted checkpoint: it needs `config.json` and "
            "`*.safetensors` weights" + (f" (found pickled weights {pickles}: re-save with "
                                         "`save_pretrained(..., safe_serialization=True)`)" if pickles else "")
            + ". Point it at the directory `hf-cpt train` wrote."
        )
    return files


def _read_run(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    config = metrics = None
    if (folder / "hf_cpt_config.yaml").is_file():
        config = yaml.safe_load((folder / "hf_cpt_config.yaml").read_text(encoding="utf-8"))
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return config, metrics or {}


def _auth_error(endpoint: str, what: str) -> PermissionError:
    return PermissionError(
        f"{what} for {endpoint}: set the `HF_TOKEN` environment variable to a token with write access, or run "
        "`hf auth login` (tokens: https://huggingface.co/settings/tokens)"
    )


def check_push_access(repo_id: str, token: str | None = None, endpoint: str | None = None) -> str:
    """Check, before anything is uploaded (or trained), that a token exists, the Hub accepts it, and its owner may
    write to `repo_id`'s namespace. Returns the token (for the caller to pass on, never to show).

    Raises:
        PermissionError: naming the problem and the fix, without the token.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint)
    token = token or get_token()
    if not token:
        raise _auth_error(api.endpoint, "no Hugging Face token found")
    try:
        who = api.whoami(token=token, cache=False)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise _auth_error(api.endpoint, "the Hugging Face token was rejected (invalid or expired)") from None
        raise
    namespace = repo_id.split("/")[0]
    allowed = {who.get("name")} | {o.get("name") for o in who.get("orgs", [])}
    if namespace not in allowed:
        raise PermissionError(
            f"`repo_id` {repo_id!r}: the token belongs to {who.get('name')!r}, who cannot write to namespace "
            f"{namespace!r} (yours: {', '.join(sorted(a for a in allowed if a))}). Use `{who.get('name')}/"
            f"{repo_id.split('/')[1]}` or a token of a member of {namespace!r}."
        )
    return token


def push_adapted(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an adapted checkpoint and its model card to a Hub repo (created if missing); return the commit URL.

    Args:
        output_dir: a directory written by `hf-cpt train` / `run_cpt` (or any safetensors checkpoint).
        repo_id: `user/name` or `org/name`; you must be that user or a member of that organisation.
        private: create the repo private. An existing repo keeps its visibility.
        revision: branch to commit to; created from `main` if it does not exist.
        token: a Hub token. Default: `HF_TOKEN`, then the `hf auth login` cache.
        commit_message: defaults to "Upload model adapted with hf-cpt".
        endpoint: Hub URL. Default: `HF_ENDPOINT` or https://huggingface.co.

    Raises:
        ValueError: not a checkpoint directory, or a malformed `repo_id`.
        PermissionError: no token, a token the Hub rejects, or a namespace the token cannot write to.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .model_card import render_model_card

    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"`output_dir` {str(folder)!r} does not exist; give the directory `hf-cpt train` wrote")
    check_repo_id(repo_id)
    files = _files_to_upload(folder)
    api = HfApi(endpoint=endpoint)
    token = check_push_access(repo_id, token=token, endpoint=endpoint)
    config, metrics = _read_run(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
        if config is not None:  # regenerate: the card records where it was pushed and the Hub metadata
            card = render_model_card(config, metrics, base_model=metrics.get("base_model"), repo_id=repo_id)
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        elif (folder / "README.md").is_file():
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(folder / "README.md")))
        info = api.create_commit(repo_id, ops, commit_message=commit_message or "Upload model adapted with hf-cpt",
                                 revision=revision, token=token)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise PermissionError(
                f"the Hub refused to write to `repo_id` {repo_id!r} (HTTP {status}): the repo may belong to someone "
                "else or the token may be read-only; use a repo in your namespace or a token with write access"
            ) from None
        raise
    logger.info("pushed %s to %s (%d files)", folder, info.commit_url, len(ops))
    return info.commit_url


# --- registry entry ---------------------------------------------------------------------------------------------------
def _before_run(cfg: CPTConfig, options: dict[str, Any]) -> str:
    """Before training (main process): the token exists and may write to `hub.repo_id`; fail now, not after it."""
    return check_push_access(cfg.hub.repo_id, token=options.get("hub_token"))


def _after_run(cfg: CPTConfig, output_dir: Path, metrics: dict[str, Any], token: str) -> None:
    """The run's last step (main process, the output directory complete): push it, record the commit."""
    metrics["hub_commit_url"] = push_adapted(output_dir, cfg.hub.repo_id, private=cfg.hub.private,
                                             revision=cfg.hub.revision, token=token)


TECHNIQUE = Technique(
    name="hub",
    key="hub",
    config=HubConfig,
    exports={**names("hub", "push_adapted", "check_push_access", "HubConfig"), "render_model_card": "model_card"},
    enabled=lambda cfg: cfg.hub.push_to_hub,
    before_run=_before_run,
    after_run=_after_run,
)
