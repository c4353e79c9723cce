"""Bad input found before any weights load, by class (issue 36): degenerate settings, data rows checked by type
with the file, line and field named, the model's files, objective and tokenizer read from its config, and I/O
failures — each one `Error:` line (exit 2), no traceback, nothing left behind, and, asserted per case, no call to
`from_pretrained` on a model class (a spy raises if the weights are about to load).

In-process (`CliRunner`): each case fails in the recipe's pre-checks, where a process boundary adds nothing.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from ..conftest import invoke_like_main, tiny_run_dict
from .test_bad_inputs import _set, _tree

pytestmark = pytest.mark.timeout(300)


class WeightsLoaded(BaseException):
    """Raised by the spy: the run got as far as loading weights (a BaseException, so nothing catches it)."""


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model class loads weights."""
    from transformers import PreTrainedModel

    def spy(cls, *args, **kwargs):
        raise WeightsLoaded(f"{cls.__name__}.from_pretrained was called")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))


def field(dotted, value, **more):
    def build(tmp, cfg):
        for k, v in {dotted: value, **more}.items():
            _set(cfg, k.replace("__", "."), v)
        return cfg
    return build


def data(name: str, content: bytes, key: str = "data.domain.train", **more):
    def build(tmp, cfg):
        (tmp / name).write_bytes(content)
        _set(cfg, key, str(tmp / name))
        for k, v in more.items():
            _set(cfg, k.replace("__", "."), v)
        return cfg
    return build


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = [{"text": f"document number {i} about a topic"} for i in range(5)]
BIG = [{"text": "x" * 200 + str(i)} for i in range(600)]  # > 64 KiB: past the first-bytes peek


def _parquet(tmp: Path, values) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "docs.parquet"
    pq.write_table(pa.table({"text": values}), path)
    return path


def parquet_ints(tmp, cfg):
    _set(cfg, "data.domain.train", str(_parquet(tmp, [1, 2, 3])))
    return cfg


def truncated_gz(tmp, cfg):
    blob = gzip.compress(lines(*BIG))
    (tmp / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    _set(cfg, "data.domain.train", str(tmp / "cut.jsonl.gz"))
    return cfg


def model_dir(kind: str):
    """A copy of the tiny model's directory with something wrong in it (config and tokenizer only are read)."""
    def build(tmp, cfg):
        import shutil

        src = Path(cfg["model"]["name_or_path"])
        out = tmp / f"model-{kind}"
        shutil.copytree(src, out)
        if kind == "no-config":
            (out / "config.json").unlink()
        elif kind == "no-tokenizer":
            for p in out.glob("tokenizer*"):
                p.unlink()
            (out / "special_tokens_map.json").unlink(missing_ok=True)
        elif kind == "no-weights":
            for p in out.glob("*.safetensors"):
                p.unlink()
        elif kind in ("no-eos", "sep-not-eos"):
            tok = json.loads((out / "tokenizer_config.json").read_text())
            tok["eos_token"] = None
            if kind == "sep-not-eos":  # the documented fallback: documents end with SEP
                tok["sep_token"] = "<eos>"  # the same token, declared as SEP only
            (out / "tokenizer_config.json").write_text(json.dumps(tok))
            (out / "special_tokens_map.json").unlink(missing_ok=True)
        elif kind == "encoder":  # a BERT config beside the tokenizer: an encoder trained with the causal loss
            from transformers import BertConfig

            BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64).save_pretrained(out)
        _set(cfg, "model.name_or_path", str(out))
        return cfg
    return build


def lexicon_missing(tmp, cfg):
    _set(cfg, "objective", "clm")
    _set(cfg, "masking", {"kind": "lexicon", "lexicon": str(tmp / "no-such-terms.txt"), "span_weight": 1})
    return cfg


def config_is_a_dir(tmp, cfg):
    return "DIR"


CASES = [
    # 1. degenerate or contradictory settings
    ("one-token-block", field("data.block_size", 1), "`data.block_size`"),
    ("kl-top-k-above-vocabulary", field("monitor.kl", True, monitor__kl_top_k=100000), "`monitor.kl_top_k`"),
    ("distill-top-k-above-vocabulary", field("train.distill", {"weight": 0.5, "top_k": 100000}),
     "`train.distill.top_k`"),
    ("average-starts-after-the-run", field("weight_averaging", {"method": "ema", "start_step": 4}),
     "`weight_averaging.start_step`"),
    ("warmup-longer-than-the-run", field("train.warmup_steps", 5), "`train.warmup_steps`"),
    ("eval-every-zero", field("train.eval_steps", 0), "`train.eval_steps`"),
    ("save-every-negative", field("train.save_steps", -1), "`train.save_steps`"),
    ("learning-rate-nan", field("train.learning_rate", float("nan")), "`train.learning_rate`"),
    ("replay-ratio-nan", field("data.replay_ratio", float("nan")), "`data.replay_ratio`"),
    ("block-above-positions", field("data.block_size", 100000), "`data.block_size`"),
    ("mlm-on-a-causal-model", field("objective", "mlm"), "`objective`"),
    ("lexicon-file-missing", lexicon_missing, "`masking.lexicon`"),
    # 2. data rows by type: file, line and field named
    ("row-text-int", data("d.jsonl", lines(*GOOD, {"text": 7})), "line 6"),
    ("row-text-null", data("d.jsonl", lines(*GOOD, {"text": None})), "is null"),
    ("row-text-list", data("d.jsonl", lines(*GOOD, {"text": ["a", "b"]})), "a list"),
    ("row-text-object", data("d.jsonl", lines(*GOOD, {"text": {"a": 1}})), "`data.domain.text_field`"),
    ("row-missing-key", data("d.jsonl", lines(*GOOD, {"body": "x"})), "line 6 has no 'text' key"),
    ("row-not-an-object", data("d.jsonl", lines(*GOOD, [1, 2])), "line 6 is a JSON list"),
    ("row-bad-json", data("d.jsonl", lines(*GOOD, b'{"text": "unclosed')), "line 6 is not valid JSON"),
    ("row-bad-json-far", data("d.jsonl", lines(*BIG, b"{oops")), "line 601"),
    ("row-not-utf8-far", data("d.jsonl", lines(*BIG, b'{"text": "caf\xe9"}')), "line 601 is not UTF-8"),
    ("row-text-int-far", data("d.jsonl", lines(*BIG, {"text": 1})), "line 601"),
    ("rows-all-blank", data("d.jsonl", lines({"text": ""}, {"text": "  "})), "blank"),
    ("row-text-int-eval", data("e.jsonl", lines(*GOOD, {"text": 3}), key="data.general.eval"),
     "`data.general.text_field`"),
    ("row-text-int-extra-eval-set", data("x.jsonl", lines(*GOOD, {"text": 4}), key="data.eval_sets.legal"),
     "`data.eval_sets.legal.text_field`: 'x.jsonl' line 6"),
    ("json-array-text-int", data("d.json", json.dumps([{"text": "a"}, {"text": 2}]).encode()), "item 1"),
    ("json-array-bad", data("d.json", b'[{"text": "a"},'), "not valid JSON"),
    ("csv-header-only", data("d.csv", b"id,text\n"), "header"),
    ("txt-not-utf8-far", data("d.txt", b"plain line\n" * 7000 + b"caf\xe9\n"), "line 7001"),
    ("parquet-text-int", parquet_ints, "`data.domain.text_field`"),
    ("parquet-garbage", data("d.parquet", b"PAR1 not really"), "parquet"),
    ("gz-truncated-far", truncated_gz, "cut.jsonl.gz"),
    ("gz-not-gzip", data("d.jsonl.gz", b"plain text, no gzip header\n"), "d.jsonl.gz"),
    ("wrong-extension", data("d.xlsx", b"PK\x03\x04"), "`data.domain.train`"),
    ("row-text-int-custom-field", data("d.jsonl", lines({"body": "a b c"}, {"body": 5}),
                                       data__domain__text_field="body"), "'body' is a int"),
    # 3. the model: files, objective vs architecture, EOS (from its config and tokenizer)
    ("model-no-config", model_dir("no-config"), "config.json"),
    ("model-no-tokenizer", model_dir("no-tokenizer"), "tokenizer files"),
    ("model-no-weights", model_dir("no-weights"), "weights"),
    ("model-tokenizer-no-eos", model_dir("no-eos"), "no EOS"),
    ("causal-objective-on-an-encoder", model_dir("encoder"), "`objective` is clm"),
    ("model-hub-id-offline", field("model.name_or_path", "someone/not-cached-model-xyz"), "HF_HUB_OFFLINE"),
    # 4. I/O
    ("hub-dataset-offline", field("data.domain.train", "hub:someone/not-cached-dataset-xyz"), "`data.domain.train`"),
    ("config-is-a-directory", config_is_a_dir, "is a directory"),
]


def _train_args(tmp: Path, model: Path, build) -> list[str]:
    cfg = tiny_run_dict(model)
    cfg["data"]["domain"] = {"train": "embedded:python-docs/train", "eval": "embedded:python-docs/validation"}
    cfg["data"]["general"] = {"train": "embedded:kjv/train", "eval": "embedded:kjv/validation"}
    built = build(tmp, cfg)
    config = tmp / "run.yaml"
    if built == "DIR":
        config = tmp / "configs"
        config.mkdir()
    else:
        config.write_text(yaml.safe_dump(built))
    return ["train", str(config), "-o", str(tmp / "out")]


def test_the_sweep_covers_each_class_with_many_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_weights_load(tmp_path, tiny_model_dir, monkeypatch, no_weights, build,
                                                       expected):
    monkeypatch.chdir(tmp_path)
    args = _train_args(tmp_path, tiny_model_dir, build)
    before = _tree(tmp_path)
    code, stderr = invoke_like_main(args)
    lines_ = [line for line in stderr.splitlines() if line.strip() and not line.startswith("hf-cpt: ")]
    shown = f"exit {code}; stderr:\n{stderr[-4000:]}"
    assert "WeightsLoaded" not in stderr, "weights loaded before the error:\n" + shown
    assert code == 2 and "Traceback" not in stderr, shown
    assert len(lines_) == 1 and lines_[0].startswith("Error: ") and expected in lines_[0], shown
    assert _tree(tmp_path) == before, "left behind: " + ", ".join(sorted(_tree(tmp_path) ^ before))


@pytest.mark.parametrize("setting, expected", [
    ({"data": {"replay_ratio": 1.0}}, "`data.replay_ratio` is 1"),
    ({"train": {"save_steps": 50}}, "`train.save_steps` (50) is above `train.max_steps`"),
    ({"active_forgetting": {"every_k_updates": 50}}, "`active_forgetting.every_k_updates` (50) is above"),
])
def test_a_legitimate_but_degenerate_setting_is_warned_once_before_weights(tmp_path, tiny_model_dir, monkeypatch,
                                                                           no_weights, caplog, setting, expected):
    """Accepted (a CMR pilot's general-only point, a run too short to checkpoint), so said once, with what will
    happen, before the weights load (the spy then stops the run)."""
    cfg = tiny_run_dict(tiny_model_dir)
    for block, values in setting.items():
        cfg.setdefault(block, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(WeightsLoaded):  # it got past every check
        invoke_like_main(["train", str(path), "-o", str(tmp_path / "out")])
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum(expected in m for m in said) == 1, said


def _empty_dir(tmp: Path) -> list[str]:
    (tmp / "not-a-run").mkdir()
    (tmp / "not-a-run" / "notes.txt").write_text("an unrelated folder")
    return ["eval", str(tmp / "not-a-run"), "--tasks", "hf_cpt_kjv_mc"]


def _header_only_records(tmp: Path) -> list[str]:
    (tmp / "records.csv").write_text("ratio,tokens,general_loss,domain_loss\n")
    return ["cmr", "fit", str(tmp / "records.csv"), "--budget-tokens", "1e6"]


def _eval_model_without_weights(tmp: Path, model: Path) -> list[str]:
    import shutil

    shutil.copytree(model, tmp / "m")
    for p in (tmp / "m").glob("*.safetensors"):
        p.unlink()
    return ["eval", str(tmp / "m"), "--tasks", "hf_cpt_kjv_mc"]


def _prepare_bad_row(tmp: Path, model: Path) -> list[str]:
    cfg = tiny_run_dict(model)
    (tmp / "d.jsonl").write_bytes(lines(*GOOD, {"text": 3}))
    cfg["data"].update(domain={"train": str(tmp / "d.jsonl")}, general=None, replay_ratio=0.0,
                       prepared_dir=str(tmp / "store"))
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    return ["prepare", str(tmp / "run.yaml")]


OTHER_COMMANDS = [
    ("prepare-bad-row", _prepare_bad_row, "'d.jsonl' line 6: 'text' is a int"),
    ("eval-on-a-folder-that-is-not-a-run", lambda tmp, model: _empty_dir(tmp), "neither an `hf-cpt train` output"),
    ("cmr-records-header-only", lambda tmp, model: _header_only_records(tmp), "records.csv' holds a header"),
    ("eval-model-without-weights", _eval_model_without_weights, "has no weights"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in OTHER_COMMANDS], ids=[c[0] for c in OTHER_COMMANDS])
def test_other_commands_refuse_bad_input_in_one_line_before_weights(tmp_path, tiny_model_dir, monkeypatch,
                                                                    no_weights, build, expected):
    monkeypatch.chdir(tmp_path)
    args = build(tmp_path, tiny_model_dir)
    before = _tree(tmp_path)
    code, stderr = invoke_like_main(args)
    lines_ = [line for line in stderr.splitlines() if line.strip() and not line.startswith("hf-cpt: ")]
    assert code == 2 and "Traceback" not in stderr and "WeightsLoaded" not in stderr, stderr[-3000:]
    assert len(lines_) == 1 and lines_[0].startswith("Error: ") and expected in lines_[0], stderr
    assert _tree(tmp_path) == before


def test_a_tokenizer_with_sep_but_no_eos_ends_documents_with_sep(tmp_path, tiny_model_dir, monkeypatch, no_weights):
    """The documented fallback (as `mixers.prepared.document_separator`): no EOS, but a SEP token, passes every
    check before the weights."""
    args = _train_args(tmp_path, tiny_model_dir, model_dir("sep-not-eos"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "model-sep-not-eos")
    assert tok.eos_token_id is None and tok.sep_token_id is not None
    with pytest.raises(WeightsLoaded):
        invoke_like_main(args)


def test_a_push_while_offline_is_one_line_before_any_weights_load(tmp_path, tiny_model_dir, monkeypatch,
                                                                   no_weights):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # the token exists; the Hub cannot be reached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    args = _train_args(tmp_path, tiny_model_dir, field("hub", {"push_to_hub": True, "repo_id": "me/medical"}))
    before = _tree(tmp_path)
    code, stderr = invoke_like_main(args)
    lines_ = [line for line in stderr.splitlines() if line.strip() and not line.startswith("hf-cpt: ")]
    assert code == 2 and "Traceback" not in stderr and "WeightsLoaded" not in stderr, stderr[-3000:]
    assert len(lines_) == 1 and lines_[0].startswith("Error: `hub.push_to_hub`: the Hub at ") and \
        "cannot be reached (HF_HUB_OFFLINE is set)" in lines_[0], stderr
    assert _tree(tmp_path) == before


def test_truncated_weights_are_one_line_naming_the_directory(tmp_path, tiny_model_dir, monkeypatch):
    """Damaged weights can only show when they load; then it is one line naming the folder, not a traceback."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = _train_args(tmp_path, broken, lambda tmp, cfg: cfg)
    code, stderr = invoke_like_main(args)
    lines_ = [line for line in stderr.splitlines() if line.strip() and not line.startswith("hf-cpt: ")]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines_) == 1 and lines_[0].startswith(f"Error: `model.name_or_path`: the weights in {str(broken)!r} "
                                                     "cannot be read"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model", "run.yaml"]
