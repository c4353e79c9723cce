"""Downstream (lm-eval) evaluation inside a stock Trainer: logged at step 0, every N-th evaluation and the end,
equal to lm-eval run on the saved checkpoint; pure cores; bad input as one clear line each."""

import copy
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

pytest.importorskip("lm_eval")

from hf_cpt import import_utils  # noqa: E402
from hf_cpt.callbacks.downstream import (  # noqa: E402
    BOOTSTRAP_ITERS,
    DownstreamConfig,
    DownstreamEvalCallback,
    attach_downstream_eval,
    downstream_breached,
    summarize_downstream,
)
from hf_cpt.callbacks.forgetting import tolerance_bound  # noqa: E402
from hf_cpt.config import DataConfig  # noqa: E402
from hf_cpt.evaluation import (  # noqa: E402
    OFFLINE_TASKS,
    evaluate_tasks,
    flatten_results,
    offline_tasks_dir,
)
from hf_cpt.recipe.data import build_eval_sets, build_train_set  # noqa: E402
from hf_cpt.testing import make_tiny_llama  # noqa: E402

LIMIT = 6


def _lm_eval_on_checkpoint(path, tasks=OFFLINE_TASKS, limit=LIMIT, batch_size=4):
    """lm-eval as a user runs it: the `hf` model loaded from the saved directory, the shipped task directory."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(path), "device": "cpu"},
                                  tasks=list(tasks), limit=limit, batch_size=batch_size,
                                  bootstrap_iters=BOOTSTRAP_ITERS,  # the scores' standard errors equal too
                                  task_manager=TaskManager(include_path=str(offline_tasks_dir()),
                                                           include_defaults=False))
    return flatten_results(out)


@pytest.mark.slow  # lm-eval on three checkpoints
def test_trainer_logs_step_0_and_end_equal_to_lm_eval_on_the_saved_checkpoints(tmp_path, tiny_tokenizer,
                                                                                tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = DataConfig(block_size=32, max_eval_blocks=2)
    args = TrainingArguments(str(tmp_path / "ckpt"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             eval_strategy="steps", eval_steps=1, eval_on_start=True, report_to="none",
                             save_strategy="no", ignore_data_skip=True, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=build_train_set(data, tiny_tokenizer),
                      eval_dataset=build_eval_sets(data, tiny_tokenizer), data_collator=default_data_collator,
                      processing_class=tiny_tokenizer)
    cb = attach_downstream_eval(trainer, DownstreamEvalCallback(tasks=list(OFFLINE_TASKS), limit=LIMIT,
                                                                batch_size=4, every_n_evals=2))
    trainer.train()
    # evaluations at 0, 1, 2, 3: every 2nd (0, 2) and the end (3); logged once per evaluation, with the losses
    assert [r["step"] for r in cb.history] == [0, 2, 3]
    logged = [r for r in trainer.state.log_history if any(k.startswith("eval_downstream/") for k in r)]
    assert [r["step"] for r in logged] == [0, 2, 3] and all("eval_general_loss" in r for r in logged)
    assert set(logged[0]) >= {f"eval_downstream/{t}/{m}" for t in OFFLINE_TASKS for m in ("acc", "acc_norm")}
    end = tmp_path / "end"
    trainer.save_model(str(end))
    assert _lm_eval_on_checkpoint(end) == {k: v for k, v in cb.history[-1].items() if k != "step"}
    assert _lm_eval_on_checkpoint(tiny_model_dir) == {k: v for k, v in cb.history[0].items() if k != "step"}
    summary = cb.summary()
    last = cb.history[-1]
    assert summary["end"] == {k: v for k, v in last.items() if k != "step" and "_stderr" not in k}
    assert summary["end_stderr"] == {k: last[k + "_stderr"] for k in summary["end"]}  # every metric has one
    assert set(summary["beyond_noise"]) == set(summary["end"])
    assert summary["higher_is_better"][f"{OFFLINE_TASKS[0]}/acc"] is True


def test_evaluation_leaves_the_model_rng_and_tokenizer_as_they_were(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    model.train()
    model.model.layers[0].eval()  # a per-module mode must come back too
    before = {n: (p.data_ptr(), p.device, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None  # lm-eval sets one on a tokenizer without: it must get its own copy
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    evaluate_tasks(model, tok, [OFFLINE_TASKS[1]], limit=2, batch_size=2)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # lm-eval reseeds; we restore
    assert model.training and not model.model.layers[0].training and torch.is_grad_enabled()
    for n, p in model.named_parameters():
        ptr, dev, rg, val = before[n]
        assert p.data_ptr() == ptr and p.device == dev and p.requires_grad == rg and torch.equal(p, val), n
    assert tok.pad_token is None


def test_downstream_breached_mirrors_tolerance_bound():
    # higher is better (accuracy): the allowed drop is the bound's allowed rise
    assert not downstream_breached(0.60, 0.56, 0.05, "absolute")
    assert downstream_breached(0.60, 0.549, 0.05, "absolute")
    allowed = tolerance_bound(0.60, 0.10, "relative") - 0.60
    assert not downstream_breached(0.60, 0.60 - allowed + 1e-9, 0.10, "relative")
    assert downstream_breached(0.60, 0.60 - allowed - 1e-9, 0.10, "relative")
    assert not downstream_breached(0.6, 0.9, 0.0)  # a rise is never a breach
    # lower is better (perplexity): a rise past the bound
    assert downstream_breached(10.0, 11.5, 0.1, "relative", higher_is_better=False)
    assert not downstream_breached(10.0, 10.9, 0.1, "relative", higher_is_better=False)


def test_summarize_and_flatten():
    history = [{"step": 0, "a/acc": 0.25, "a/acc_stderr": 0.1}, {"step": 4, "a/acc": 0.5, "b/ppl": 3.0}]
    s = summarize_downstream(history)
    assert s == {"start": {"a/acc": 0.25, "b/ppl": 3.0}, "end": {"a/acc": 0.5, "b/ppl": 3.0},
                 "delta": {"a/acc": 0.25, "b/ppl": 0.0},  # a/acc has no error bar at the end: none judged
                 "start_stderr": {}, "end_stderr": {}, "delta_stderr": {}, "beyond_noise": {}}
    raw = {"results": {"t": {"alias": "t", "sample_len": 5, "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
                       "g": {"exact_match,strict-match": 0.75, "exact_match,flexible": 1}}}
    assert flatten_results(raw) == {"t/acc": 0.5, "t/acc_stderr": 0.1, "t/acc_norm": 0.25,
                                    "g/exact_match/strict-match": 0.75, "g/exact_match/flexible": 1.0}
    assert flatten_results(raw, ["acc"]) == {"t/acc": 0.5, "t/acc_stderr": 0.1}


def test_a_change_inside_its_error_bar_is_reported_as_noise():
    """25 items: accuracy moves in steps of 0.04 with a standard error near 0.1, so +0.04 is noise, +0.40 is not;
    the summary, the model card table and the CLI's change column say which."""
    from hf_cpt.evaluation import format_change
    from hf_cpt.model_card import downstream_table

    history = [{"step": 0, "t/acc": 0.28, "t/acc_stderr": 0.0917, "u/acc": 0.20, "u/acc_stderr": 0.0816},
               {"step": 4, "t/acc": 0.32, "t/acc_stderr": 0.0952, "u/acc": 0.60, "u/acc_stderr": 0.1}]
    s = summarize_downstream(history)
    assert s["delta_stderr"]["t/acc"] == pytest.approx((0.0917 ** 2 + 0.0952 ** 2) ** 0.5)
    assert s["beyond_noise"] == {"t/acc": False, "u/acc": True}
    assert format_change(s["delta"]["t/acc"], s["delta_stderr"]["t/acc"]) == "+0.0400 ± 0.2591 (within noise)"
    assert format_change(s["delta"]["u/acc"], s["delta_stderr"]["u/acc"]) == "+0.4000 ± 0.2530"
    assert format_change(0.04, None) == "+0.0400"
    table = downstream_table(s)
    assert "| t/acc | 0.2800 ± 0.0917 | 0.3200 ± 0.0952 | +0.0400 ± 0.2591 (within noise) |" in table
    assert "| u/acc | 0.2000 ± 0.0816 | 0.6000 ± 0.1000 | +0.4000 ± 0.2530 |" in table


def test_tolerance_warns_or_stops_on_a_drop():
    cb = DownstreamEvalCallback(tasks=[OFFLINE_TASKS[1]], tolerance_metric=f"{OFFLINE_TASKS[1]}/acc",
                                tolerance=0.1, action="stop")
    cb.higher_is_better = {f"{OFFLINE_TASKS[1]}/acc": True}
    state, control = TrainerState(), TrainerControl()
    for step, acc in ((0, 0.5), (2, 0.45), (4, 0.35)):
        cb.history.append({"step": step, f"{OFFLINE_TASKS[1]}/acc": acc})
        cb._check(cb.history[-1], state, control)
        assert control.should_training_stop is (step == 4)
    assert cb.breach_step == 4 and cb.summary()["tolerance_breached"]


def test_history_is_rebuilt_from_the_log_history_on_resume():
    state = TrainerState()
    key = f"{OFFLINE_TASKS[1]}/acc"
    state.log_history = [{"eval_general_loss": 3.0, f"eval_downstream/{key}": 0.5, "step": 0},
                         {"loss": 2.9, "step": 1}, {"eval_general_loss": 2.8, "step": 2},
                         {"eval_general_loss": 2.7, f"eval_downstream/{key}": 0.3, "step": 4}]
    cb = DownstreamEvalCallback(tasks=[OFFLINE_TASKS[1]], tolerance_metric=key, tolerance=0.1)
    args = TrainingArguments("unused", eval_strategy="steps", eval_on_start=False, report_to="none", use_cpu=True)
    cb.on_train_begin(args, state, TrainerControl())  # no step-0 evaluation needed: restored from the history
    assert cb.history == [{"step": 0, key: 0.5}, {"step": 4, key: 0.3}] and cb._rounds == 3
    assert cb.breach_step == 4


@pytest.mark.slow  # indexes lm-eval's whole task registry (~9 s under load)
def test_bad_input_one_clear_line_each(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'hf_cpt_kjv_m'; close names: hf_cpt_kjv_mc"):
        DownstreamEvalCallback(tasks=["hf_cpt_kjv_m"])
    with pytest.raises(FileNotFoundError, match="`include_path` .*missing.* is not a directory"):
        DownstreamEvalCallback(tasks=[OFFLINE_TASKS[0]], include_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"`metrics`: no task .* reports 'bleu'; they report: acc, acc_norm"):
        DownstreamEvalCallback(tasks=[OFFLINE_TASKS[0]], metrics=["bleu"])
    with pytest.raises(ValueError, match=r"`tolerance_metric` 'hf_cpt_kjv_mc/f1': task 'hf_cpt_kjv_mc' does not "
                                         r"report 'f1'; it reports: acc, acc_norm"):
        DownstreamEvalCallback(tasks=[OFFLINE_TASKS[1]], tolerance_metric="hf_cpt_kjv_mc/f1", tolerance=0.1)
    with pytest.raises(ValueError, match="task 'hellaswag' is not evaluated"):
        DownstreamEvalCallback(tasks=[OFFLINE_TASKS[1]], tolerance_metric="hellaswag/acc", tolerance=0.1)
    with pytest.raises(ValueError, match="`tolerance` and `tolerance_metric` go together"):
        DownstreamConfig(tasks=["x"], tolerance=0.1)
    real = import_utils.is_available
    monkeypatch.setattr(import_utils, "is_available", lambda name: name != "lm_eval" and real(name))
    with pytest.raises(ImportError, match=r"pip install 'hf-cpt\[eval\]'"):
        DownstreamEvalCallback(tasks=[OFFLINE_TASKS[0]])


@pytest.mark.slow  # runs lm-eval twice
def test_user_include_path_with_json_data_files_runs_offline(tmp_path, tiny_tokenizer):
    # a user's own task: a standard `dataset_path: json` YAML over a local file, loaded with HF_DATASETS_OFFLINE=1
    rows = tmp_path / "rows.jsonl"
    shutil.copy(offline_tasks_dir() / f"{OFFLINE_TASKS[1]}.jsonl", rows)
    (tmp_path / "mine.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    model = make_tiny_llama(len(tiny_tokenizer))
    ours = flatten_results(evaluate_tasks(model, tiny_tokenizer, [OFFLINE_TASKS[1]], limit=3, batch_size=3))
    mine = flatten_results(evaluate_tasks(model, tiny_tokenizer, ["my_task"], include_path=tmp_path, limit=3,
                                          batch_size=3))
    assert mine == {"my_task/acc": ours[f"{OFFLINE_TASKS[1]}/acc"]}  # same rows, same scores


@pytest.mark.slow  # two processes (torchrun) and lm-eval
@pytest.mark.timeout(300)
def test_two_process_run_evaluates_on_rank_0_without_hanging(tmp_path, tiny_model_dir):
    import json
    import os
    import subprocess
    import sys

    import yaml

    from ..conftest import tiny_run_dict

    cfg = tiny_run_dict(tiny_model_dir, max_steps=4, per_device_train_batch_size=1)
    cfg["downstream"] = {"tasks": list(OFFLINE_TASKS), "limit": 4, "batch_size": 4, "every_n_evals": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", "train", str(tmp_path / "run.yaml"), "-o",
                           str(tmp_path / "out"), "--nproc", "2"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["world_size"] == 2 and [r["step"] for r in m["downstream"]["history"]] == [0, 4]
    logged = [r["step"] for r in m["log_history"] if f"eval_downstream/{OFFLINE_TASKS[0]}/acc" in r]
    assert logged == [0, 4]


def test_forgetting_plot_gets_a_downstream_panel(tmp_path):
    import matplotlib.image

    from hf_cpt.plotting import plot_forgetting

    history = [{"step": 0, "general_loss": 3.0, "domain_loss": 3.2}, {"step": 4, "general_loss": 3.1,
                                                                       "domain_loss": 2.9}]
    downstream = [{"step": 0, "t/acc": 0.3, "t/acc_stderr": 0.1}, {"step": 4, "t/acc": 0.4}]
    without = matplotlib.image.imread(plot_forgetting(history, tmp_path / "a.png"))
    with_panel = matplotlib.image.imread(plot_forgetting(history, tmp_path / "b.png", downstream=downstream))
    assert with_panel.shape[1] == pytest.approx(without.shape[1] * 3 / 2, rel=0.02)  # a third panel
