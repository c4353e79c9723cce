"""The bad-input sweep: every malformed config, data file, model, output dir or flag makes `hf-cpt train` exit 2
with exactly one line on stderr naming the field, no traceback, and nothing left behind.

Every case fails before any weights load (config validation, data-file checks, the model's config and tokenizer),
in code the process boundary adds nothing to, so each runs the typer app in-process (`CliRunner`, a few ms), with
the package's log lines and any Python warning on stderr as `main()` would print them. A handful of cases, one per
kind of input, also run the real CLI in a subprocess: the exit status and the one stderr line end to end.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import invoke_like_main, tiny_run_dict

pytestmark = pytest.mark.timeout(300)
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")


def run_cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _set(cfg: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return cfg


# --- cases: (id, how to build the inputs, the field the one error line must name) ----------------------------
# A builder gets (tmp, the tiny-model run dict) and returns {"cfg": dict} or {"raw": bytes} or {"missing": True}
# for the config file, optionally with "argv" (extra flags) and "out" (another output dir).

def field(dotted, value):
    return lambda tmp, cfg: {"cfg": _set(cfg, dotted, value)}


def raw(content: bytes):
    return lambda tmp, cfg: {"raw": content}


def data_file(name: str, content: bytes, key: str = "data.domain.train", text_field: str | None = None):
    def build(tmp, cfg):
        (tmp / name).write_bytes(content)
        _set(cfg, key, str(tmp / name))
        if text_field is not None:
            _set(cfg, key.rsplit(".", 1)[0] + ".text_field", text_field)
        return {"cfg": cfg}
    return build


def argv(*extra, out=None, cfg_change=None):
    def build(tmp, cfg):
        if cfg_change:
            _set(cfg, *cfg_change)
        spec = {"cfg": cfg, "argv": [a.replace("{tmp}", str(tmp)) for a in extra]}
        if out is not None:
            spec["out"] = out(tmp)
        return spec
    return build


def model(kind: str):
    def build(tmp, cfg):
        _set(cfg, "model.name_or_path", str(_mismatched_model(tmp, kind, Path(cfg["model"]["name_or_path"]))))
        if kind == "llama_positions":
            _set(cfg, "data.block_size", 1024)
        if kind == "gpt2_positions":
            _set(cfg, "data.block_size", 128)
        return {"cfg": cfg}
    return build


def _mismatched_model(tmp: Path, kind: str, tiny: Path) -> Path:
    """A model directory whose config disagrees with the tiny model's tokenizer or with the run (no weights needed:
    the checks read only the config and the tokenizer)."""
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig

    out = tmp / f"model-{kind}"
    tok = AutoTokenizer.from_pretrained(tiny)
    rows = len(tok) - 40 if kind == "vocab" else len(tok)
    if kind == "gpt2_positions":
        config = GPT2Config(vocab_size=rows, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0)
    else:
        config = LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=512)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _gz(content: bytes) -> bytes:
    return gzip.compress(content)


CASES = [
    # the config file itself
    ("yaml-unclosed-brace", raw(b"model: {name_or_path: x\n"), "config file"),
    ("yaml-bad-indent", raw(b"train:\n  max_steps: 3\n bad: 1\n"), "config file"),
    ("yaml-empty-file", raw(b""), "config file"),
    ("yaml-only-comments", raw(b"# nothing here\n"), "config file"),
    ("yaml-top-level-list", raw(b"- model\n- data\n"), "config file"),
    ("yaml-top-level-scalar", raw(b"hello\n"), "config file"),
    ("yaml-not-utf8", raw(b"model: {name_or_path: caf\xe9}\n"), "config file"),
    ("yaml-binary", raw(b"\x00\x01\x02PK\x03\x04"), "config file"),
    ("yaml-missing-file", lambda tmp, cfg: {"missing": True}, "config file"),
    # types
    ("type-max-steps-string", field("train.max_steps", "ten"), "`train.max_steps`"),
    ("type-learning-rate-string", field("train.learning_rate", "fast"), "`train.learning_rate`"),
    ("type-block-size-float", field("data.block_size", 12.5), "`data.block_size`"),
    ("type-replay-ratio-string", field("data.replay_ratio", "a lot"), "`data.replay_ratio`"),
    ("type-bf16-int", field("train.bf16", 3), "`train.bf16`"),
    ("type-model-not-mapping", field("model", "just a string"), "`model`"),
    ("type-domain-list", field("data.domain", ["a", "b"]), "`data.domain`"),
    ("type-report-to-int", field("train.report_to", 5), "`train.report_to`"),
    # ranges
    ("range-max-steps-zero", field("train.max_steps", 0), "`train.max_steps`"),
    ("range-replay-ratio", field("data.replay_ratio", 1.5), "`data.replay_ratio`"),
    ("range-learning-rate", field("train.learning_rate", -1), "`train.learning_rate`"),
    ("range-warmup-longer-than-run", field("train.warmup_steps", 99), "`train.warmup_steps`"),
    ("range-block-size-zero", field("data.block_size", 0), "`data.block_size`"),
    ("range-batch-size-zero", field("train.per_device_train_batch_size", 0), "`train.per_device_train_batch_size`"),
    ("range-max-eval-blocks", field("data.max_eval_blocks", -1), "`data.max_eval_blocks`"),
    # unknown fields and names
    ("unknown-top-level", field("modle", {"name_or_path": "x"}), "`modle`"),
    ("unknown-train-field", field("train.max_step", 3), "`train.max_step`"),
    ("unknown-training-arg", field("train.training_args", {"optimm": "adamw_torch"}), "`train.training_args.optimm`"),
    ("unknown-optimizer", field("train.training_args", {"optim": "adamw_torh"}), "`train.training_args.optim`"),
    ("unknown-scheduler", field("train.lr_scheduler_type", "cosin"), "`train.lr_scheduler_type`"),
    ("unknown-granularity", field("data.granularity", "word"), "`data.granularity`"),
    ("unknown-dtype", field("model.dtype", "float8"), "`model.dtype`"),
    ("reserved-training-arg", field("train.training_args", {"output_dir": "x"}), "`train.training_args.output_dir`"),
    ("replay-without-general", field("data.general", None), "`data.replay_ratio`"),
    # data files
    ("data-missing-file", field("data.domain.train", "no/such/file.jsonl"), "`data.domain.train`"),
    ("data-glob-matches-nothing", field("data.domain.train", "nothing-*.jsonl"), "`data.domain.train`"),
    ("data-unknown-embedded", field("data.domain.train", "embedded:nope/train"), "`data.domain.train`"),
    ("data-unsupported-extension", data_file("notes.docx", b"PK\x03\x04"), "`data.domain.train`"),
    ("data-empty-jsonl", data_file("empty.jsonl", b""), "`data.domain.train`"),
    ("data-empty-eval", data_file("empty.txt", b"", key="data.general.eval"), "`data.general.eval`"),
    ("data-whitespace-txt", data_file("blank.txt", b"\n  \n\n"), "`data.domain.train`"),
    ("data-empty-gz", data_file("empty.jsonl.gz", _gz(b"")), "`data.domain.train`"),
    ("data-corrupt-gz", data_file("bad.jsonl.gz", b"not gzip at all"), "`data.domain.train`"),
    ("data-binary", data_file("blob.jsonl", b'{"text": "a"}\n\x00\x00\x00\x01'), "`data.domain.train`"),
    ("data-not-utf8", data_file("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1")), "`data.domain.train`"),
    ("data-not-json", data_file("lines.jsonl", b"just text, not json\n"), "`data.domain.train`"),
    ("data-wrong-column-jsonl", data_file("docs.jsonl", b'{"body": "some text"}\n'), "`data.domain.text_field`"),
    ("data-wrong-column-csv", data_file("docs.csv", b"id,body\n1,some text\n"), "`data.domain.text_field`"),
    ("data-txt-with-column", data_file("docs.txt", b"some text\n", text_field="body"), "`data.domain.text_field`"),
    # model / tokenizer / positions
    ("model-missing-dir", field("model.name_or_path", "./no/such/model"), "`model.name_or_path`"),
    ("model-unknown-embedded", field("model.name_or_path", "embedded:nope"), "`model.name_or_path`"),
    ("model-is-a-file", argv(cfg_change=("model.name_or_path", "run.yaml")), "`model.name_or_path`"),
    ("model-tokenizer-larger-than-embeddings", model("vocab"), "`model.name_or_path`"),
    ("positions-llama-max-position-embeddings", model("llama_positions"), "`data.block_size`"),
    ("positions-gpt2-n-positions", model("gpt2_positions"), "`data.block_size`"),
    # output directories
    ("output-is-a-file", argv(out=lambda tmp: tmp / "run.yaml"), "`output_dir`"),
    ("output-under-a-file", argv(out=lambda tmp: tmp / "run.yaml" / "out"), "`output_dir`"),
    ("output-unwritable", argv(out=lambda tmp: Path("/proc/hfcpt_out")), "`output_dir`"),
    ("output-not-empty", argv(out=lambda tmp: _nonempty(tmp)), "`output_dir`"),
    # flags
    ("flag-nproc-zero", argv("--nproc", "0"), "`--nproc`"),
    ("flag-max-steps-negative", argv("--max-steps", "-1"), "`train.max_steps`"),
    ("flag-config-and-template", argv("--template", "quickstart"), "`--template"),
    ("flag-resume-without-checkpoints", argv("--resume"), "`resume`"),
    ("flag-resume-nothing-saved", argv("--resume", cfg_change=("train.save_steps", 2)), "`resume`"),
]


def _nonempty(tmp: Path) -> Path:
    out = tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    return out


def test_the_sweep_is_at_least_as_broad_as_the_issue():
    assert len(CASES) >= 43 and len({c[0] for c in CASES}) == len(CASES)
    assert END_TO_END <= {c[0] for c in CASES}


# the cases that also run the real CLI in a subprocess: one per kind of input; the first stays in the fast lane
END_TO_END = {"unknown-train-field", "yaml-not-utf8", "range-warmup-longer-than-run", "data-corrupt-gz",
              "model-tokenizer-larger-than-embeddings", "output-unwritable", "flag-resume-nothing-saved"}
FAST_END_TO_END = "unknown-train-field"


def _train_args(tmp_path: Path, model_dir: Path, build) -> list[str]:
    """Write the case's inputs under `tmp_path`; the `hf-cpt train` arguments that read them."""
    cfg = tiny_run_dict(model_dir)
    cfg["data"]["domain"] = {"train": "embedded:python-docs/train", "eval": "embedded:python-docs/validation"}
    cfg["data"]["general"] = {"train": "embedded:kjv/train", "eval": "embedded:kjv/validation"}
    spec = build(tmp_path, cfg)
    config = tmp_path / "run.yaml"
    if "raw" in spec:
        config.write_bytes(spec["raw"])
    elif spec.get("missing"):
        config = tmp_path / "missing.yaml"
    else:
        config.write_text(yaml.safe_dump(spec["cfg"]))
    out = spec.get("out", tmp_path / "out")
    return ["train", str(config), "-o", str(out), *spec.get("argv", [])]


def _check_one_line(code: int, stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    shown = f"exit {code}; stderr:\n{stderr[-4000:]}"
    assert code == 2, shown
    assert "Traceback" not in stderr, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("Error: ") and expected in lines[0], shown


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, tiny_model_dir, monkeypatch, build, expected):
    monkeypatch.chdir(tmp_path)  # relative paths in a case resolve where the user would run it
    args = _train_args(tmp_path, tiny_model_dir, build)
    before = _tree(tmp_path)
    code, stderr = invoke_like_main(args)
    _check_one_line(code, stderr, expected)
    assert _tree(tmp_path) == before, "left behind: " + ", ".join(sorted(_tree(tmp_path) ^ before))


@pytest.mark.parametrize("build, expected", [
    pytest.param(*c[1:], id=c[0], marks=() if c[0] == FAST_END_TO_END else pytest.mark.slow)
    for c in CASES if c[0] in END_TO_END])
def test_bad_input_through_the_real_cli(tmp_path, tiny_model_dir, build, expected):
    """The same, through `python -m hf_cpt.cli.main` in a process of its own: exit status 2 and one stderr line."""
    args = _train_args(tmp_path, tiny_model_dir, build)
    before = _tree(tmp_path)
    proc = run_cli(args, cwd=tmp_path)
    _check_one_line(proc.returncode, proc.stderr, expected)
    assert _tree(tmp_path) == before, "left behind: " + ", ".join(sorted(_tree(tmp_path) ^ before))


def _tree(root: Path) -> set[str]:
    """Every path under `root` (hidden staging dirs included), relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}
