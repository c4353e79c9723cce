import json
import math
import pickle

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from hf_cpt.callbacks.rewarm import (
    CycleConfig,
    RewarmCallback,
    RewarmConfig,
    RewarmSchedule,
    build_cycles,
    lr_at_checkpoint,
    lr_multiplier,
    lr_multiplier_cycles,
    make_rewarm_optimizer,
    make_rewarm_scheduler,
)
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama


def _hf_multipliers(factory, steps, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = factory(opt, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, total, min_rate", [(0, 10, 0.0), (3, 17, 0.1), (10, 10, 0.0), (7, 101, 0.33)])
def test_rewarm_cosine_reproduces_transformers_cosine_with_min_lr(warmup, total, min_rate):
    ref = _hf_multipliers(get_cosine_with_min_lr_schedule_with_warmup, total, num_warmup_steps=warmup,
                          num_training_steps=total, min_lr_rate=min_rate)
    cfg = RewarmConfig(warmup_steps=warmup, min_lr_ratio=min_rate, decay="cosine")
    ours = [lr_multiplier(s, cfg, total) for s in range(total)]
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-9


@pytest.mark.parametrize("warmup_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("warmup, decay, total, min_ratio", [(4, 6, 23, 0.0), (0, 5, 5, 0.2), (5, 9, 31, 0.05)])
def test_wsd_reproduces_transformers_get_wsd_schedule(warmup_type, decay_type, warmup, decay, total, min_ratio):
    ref = _hf_multipliers(get_wsd_schedule, total + 3, num_warmup_steps=warmup, num_decay_steps=decay,
                          num_training_steps=total, warmup_type=warmup_type, decay_type=decay_type,
                          min_lr_ratio=min_ratio)
    # transformers' WSD warms up from min_lr_ratio
    cfg = RewarmConfig(schedule="wsd", warmup_steps=warmup, decay_steps=decay, warmup=warmup_type,
                       decay=decay_type, min_lr_ratio=min_ratio, warmup_start=min_ratio)
    ours = [lr_multiplier(s, cfg, total) for s in range(total + 3)]
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-9


def test_linear_constant_and_inverse_sqrt_match_transformers():
    ref = _hf_multipliers(get_linear_schedule_with_warmup, 30, num_warmup_steps=5, num_training_steps=30)
    assert max(abs(lr_multiplier(s, RewarmConfig(warmup_steps=5, decay="linear"), 30) - r)
               for s, r in enumerate(ref)) < 1e-9
    ref = _hf_multipliers(get_constant_schedule_with_warmup, 30, num_warmup_steps=5)
    assert max(abs(lr_multiplier(s, RewarmConfig(schedule="constant", warmup_steps=5), 30) - r)
               for s, r in enumerate(ref)) < 1e-9
    ref = _hf_multipliers(get_inverse_sqrt_schedule, 50, num_warmup_steps=6)
    assert max(abs(lr_multiplier(s, RewarmConfig(warmup_steps=6, decay="inverse_sqrt"), 50) - r)
               for s, r in enumerate(ref)) < 1e-9


def test_multi_cycle_boundaries_hit_configured_peaks_and_floors_exactly():
    cycles = [CycleConfig(steps=20, peak=1.0, warmup_steps=4, floor=0.1),
              CycleConfig(steps=15, peak=0.5, warmup_steps=3, floor=0.05, decay="linear"),
              CycleConfig(steps=10, peak=0.8, warmup_steps=2, warmup_start=0.0, stable_steps=3, floor=0.0,
                          decay="1-sqrt")]
    cfg = RewarmConfig(schedule="cycles", cycles=cycles)
    m = lambda s: lr_multiplier(s, cfg, 45)  # noqa: E731
    assert m(0) == 0.0 and m(4) == 1.0
    assert m(20) == 0.1 and m(23) == 0.5  # stage 2 re-warms from stage 1's floor to its own peak
    assert m(35) == 0.05 * 0 + 0.0 and m(37) == 0.8 and m(40) == 0.8  # stage 3 starts from 0 as configured
    assert m(45) == 0.0
    # inside a stage the LR never leaves [floor, peak]
    assert all(0.1 <= m(s) <= 1.0 for s in range(4, 20))
    assert [lr_multiplier_cycles(s, cycles)[1] for s in (0, 19, 20, 34, 35, 44)] == [0, 0, 1, 1, 2, 2]


def test_cycle_steps_repeat_the_cycle():
    cfg = RewarmConfig(warmup_steps=3, cycle_steps=10, min_lr_ratio=0.1)
    values = [lr_multiplier(s, cfg, 35) for s in range(35)]
    assert values[:10] == values[10:20] == values[20:30] and values[30:35] == values[:5]
    assert values[3] == 1.0 and values[10] == 0.0
    assert len(build_cycles(cfg, 35)) == 4


def test_infinite_schedule_phases():
    cfg = RewarmConfig(schedule="infinite", warmup_steps=5, decay_steps=10, constant_lr_ratio=0.4,
                       anneal_steps=8, min_lr_ratio=0.0, decay="linear")
    m = [lr_multiplier(s, cfg, 50) for s in range(51)]
    assert m[5] == 1.0 and m[15] == pytest.approx(0.4) and m[15:42] == [m[15]] * 27
    assert m[42] == pytest.approx(0.4) and m[46] == pytest.approx(0.2) and m[50] == 0.0
    assert all(a >= b for a, b in zip(m[5:], m[6:]))


def test_warmup_from_checkpoint_lr(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"learning_rate": 3e-4, "step": 1}, {"loss": 1.0}, {"learning_rate": 3e-5, "step": 9}]}))
    last = lr_at_checkpoint(tmp_path)
    assert last == 3e-5
    cfg = RewarmConfig(warmup_steps=4, warmup_start=last / 1e-4)
    assert lr_multiplier(0, cfg, 20) == pytest.approx(0.3)
    with pytest.raises(FileNotFoundError, match="not a Trainer checkpoint"):
        lr_at_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=30, total_steps=20), "`warmup_steps` (30) is longer than the run"),
        (dict(min_lr_ratio=1.5), "`min_lr_ratio` (1.5) must be <= 1"),
        (dict(min_lr_ratio=-0.1), "`min_lr_ratio` must be >= 0"),
        (dict(decay="exponential"), "`decay` must be one of"),
        (dict(schedule="wsd", total_steps=10), "`decay_steps` is required"),
        (dict(schedule="cycles"), "`cycles` is empty"),
        (dict(schedule="cycles", cycles=[{"steps": 5, "peak": 0.1, "floor": 0.2}]), "above `cycles[0].peak`"),
        (dict(schedule="cycles", cycles=[{"steps": 5, "warmup_steps": 6}]), "longer than the cycle (`cycles[0].steps`=5)"),
        (dict(embedding_lr_ratio=-1), "`embedding_lr_ratio`"),
        (dict(schedule="cosine"), "`schedule` must be one of"),
    ],
)
def test_bad_schedules_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        RewarmConfig(**kwargs)
    assert message in str(e.value)


def test_schedule_pickles_with_its_config():
    sched = RewarmSchedule(RewarmConfig(warmup_steps=2, cycle_steps=5), 20)
    again = pickle.loads(pickle.dumps(sched))
    assert [again(s) for s in range(20)] == [sched(s) for s in range(20)]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    state = make_rewarm_scheduler(opt, RewarmConfig(warmup_steps=2), 10).state_dict()
    assert state["lr_lambdas"][0]["config"]["warmup_steps"] == 2


def test_rewarm_optimizer_puts_embeddings_in_their_own_group():
    model = make_tiny_llama(100)
    opt = make_rewarm_optimizer(model, RewarmConfig(embedding_lr_ratio=3.0), learning_rate=1e-3, weight_decay=0.1)
    emb = [g for g in opt.param_groups if any(p is model.get_input_embeddings().weight for p in g["params"])]
    assert len(emb) == 1 and emb[0]["lr"] == pytest.approx(3e-3) and len(emb[0]["params"]) == 1  # tied: once
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len({id(p) for p in model.parameters()})
    norms = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert norms and all(p.dim() == 1 for p in norms[0]["params"])


# --- Trainer ---------------------------------------------------------------------------------------------------
BASE_LR = 1e-3
STAGES = RewarmConfig(schedule="cycles", cycles=[CycleConfig(steps=6, warmup_steps=2, floor=0.1),
                                                 CycleConfig(steps=6, peak=0.5, warmup_steps=2, floor=0.0)])


def _trainer(tmp_path, tiny_tokenizer, cfg, via="callback", max_steps=12, save_steps=0):
    data = DataConfig(block_size=32)
    train = build_train_set(data, tiny_tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=BASE_LR,
        logging_steps=1, report_to="none", use_cpu=True, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    model = make_tiny_llama(len(tiny_tokenizer))
    optimizers = (None, None)
    if via == "factory":
        opt = make_rewarm_optimizer(model, cfg, BASE_LR)
        optimizers = (opt, make_rewarm_scheduler(opt, cfg, max_steps))
    return Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                   callbacks=[RewarmCallback(cfg)], optimizers=optimizers)


def _logged_lrs(trainer):
    return [(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
@pytest.mark.parametrize("via", ["callback", "factory"])
def test_trainer_follows_the_schedule(tmp_path, tiny_tokenizer, via):
    trainer = _trainer(tmp_path, tiny_tokenizer, STAGES, via=via)
    trainer.train()
    logged = _logged_lrs(trainer)
    assert [s for s, _ in logged] == list(range(1, 13))
    # the Trainer logs at step k the LR of update k, i.e. of scheduler step k - 1
    for step, lr in logged:
        assert math.isclose(lr, BASE_LR * lr_multiplier(step - 1, STAGES, 12), rel_tol=1e-9, abs_tol=1e-15)
    assert logged[0][1] == 0.0 and logged[2][1] == BASE_LR and logged[6][1] == pytest.approx(0.1 * BASE_LR)


@pytest.mark.slow  # two Trainer runs and a resume
@pytest.mark.parametrize("via", ["callback", "factory"])
def test_resume_mid_cycle_gives_the_identical_lr_sequence(tmp_path, tiny_tokenizer, via):
    full = _trainer(tmp_path / "full", tiny_tokenizer, STAGES, via=via, save_steps=4)
    full.train()
    resumed = _trainer(tmp_path / "full", tiny_tokenizer, STAGES, via=via, save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))  # inside stage 0's decay
    after = [x for x in _logged_lrs(resumed) if x[0] > 4]
    assert after == [x for x in _logged_lrs(full) if x[0] > 4]
    assert len(after) == 8


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_callback_adds_the_stage_to_the_logs(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, STAGES, max_steps=12)
    trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RewarmCallback))
    stages = []
    for step in range(1, 13):
        trainer.state.global_step = step
        logs = {"learning_rate": 1.0}
        cb.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
        stages.append(logs["lr_stage"])
    assert stages == [0] * 6 + [1] * 6


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_lr_stage_reaches_the_log_history(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, STAGES, max_steps=12)
    trainer.train()
    logged = [(h["step"], h["lr_stage"]) for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged) == 12  # every LR record carries its stage (it is what trainer_state.json saves)
    assert logged == [(s, 0 if s <= 6 else 1) for s in range(1, 13)]


def test_callback_refuses_embedding_ratio_without_own_optimizer(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="make_rewarm_optimizer"):
        _trainer(tmp_path, tiny_tokenizer, RewarmConfig(embedding_lr_ratio=2.0)).train()
