"""Weight averaging: the cores against naive references, the callback in a Trainer (the average it keeps, the
losses it logs, shipping), and an exact resume from a checkpoint for both methods."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_cpt.callbacks.weight_averaging import (STATE_FILE, WeightAveragingCallback, WeightAveragingConfig,
                                               average_due, ema_update, held_out_loss, window_average)
from hf_cpt.testing import make_tiny_llama


@pytest.mark.parametrize("shape", [(7, 3), (5,), (), (2, 3, 5)])
def test_cores_match_naive_references(shape):
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(shape, generator=g), torch.randn(shape, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(ema_update(a, w, 0.9), 0.9 * a + 0.1 * w.float())
    snaps = [torch.randn(shape, generator=g) for _ in range(3)]
    torch.testing.assert_close(window_average(snaps), torch.stack(snaps).mean(0))
    assert [s for s in range(10) if average_due(s, 2, 3)] == [2, 5, 8]
    with pytest.raises(ValueError, match="empty"):
        window_average([])


def test_config_is_checked():
    for bad, field in (({"method": "swa"}, "method"), ({"decay": 1.0}, "decay"), ({"k": 0}, "k"),
                       ({"every": 0}, "every"), ({"device": "gpu"}, "device"), ({"ship": "yes"}, "ship")):
        with pytest.raises(ValueError, match=f"`{field}`"):
            WeightAveragingConfig(**bad)


def _blocks(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (n, 16), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


class _Recorder(TrainerCallback):
    """The trainable weights after every update, and a stop after `stop_at` updates (a simulated crash)."""

    def __init__(self, stop_at: int | None = None):
        self.weights, self.stop_at = [], stop_at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True
        return control


def _train(tmp_path, config, *, steps=6, resume=None, stop_at=None, save_steps=3, evaluate=False):
    model = make_tiny_llama(64, seed=0)
    sets = {"domain": _blocks(4, 1), "general": _blocks(4, 2)}
    averaging = WeightAveragingCallback(config, eval_sets=sets, batch_size=2)
    recorder = _Recorder(stop_at)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps",
                             save_steps=save_steps, report_to="none", seed=0, logging_steps=1,
                             eval_strategy="steps" if evaluate else "no", eval_steps=3, eval_on_start=evaluate,
                             per_device_eval_batch_size=2, use_cpu=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=_blocks(24, 0), eval_dataset=sets if evaluate else None,
                      callbacks=[averaging, recorder])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, averaging, recorder


def test_ema_in_a_trainer_is_the_ema_of_the_weights_and_its_loss_is_logged(tmp_path):
    cfg = WeightAveragingConfig(method="ema", decay=0.5, every=2, start_step=1)
    trainer, averaging, recorder = _train(tmp_path, cfg, evaluate=True)
    # updates at steps 1, 3, 5 (weights after those updates: recorder index step - 1)
    want = {n: w.float() for n, w in recorder.weights[0].items()}
    for step in (3, 5):
        want = {n: 0.5 * a + 0.5 * recorder.weights[step - 1][n] for n, a in want.items()}
    got = averaging.averaged_weights()
    assert set(got) == set(want) and averaging.updates == 3
    for n in got:
        torch.testing.assert_close(got[n], want[n])
    evals = [r for r in trainer.state.log_history if "eval_domain_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["eval_avg_domain_loss"] == evals[0]["eval_domain_loss"]  # before any update: the live model
    assert evals[-1]["eval_avg_domain_loss"] != evals[-1]["eval_domain_loss"]
    general = [r for r in trainer.state.log_history if "eval_general_loss" in r]  # one record per set
    with averaging.swapped_in(trainer.model):
        assert general[-1]["eval_avg_general_loss"] == pytest.approx(
            held_out_loss(trainer.model, _blocks(4, 2), 2), abs=1e-6)
    live = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(live[n], recorder.weights[-1][n]) for n in live)  # swapped back
    # held_out_loss is the Trainer's evaluation loss
    assert trainer.evaluate()["eval_domain_loss"] == pytest.approx(held_out_loss(trainer.model, _blocks(4, 1), 2),
                                                                   abs=1e-6)


def test_last_k_and_shipping(tmp_path):
    cfg = WeightAveragingConfig(method="last_k", k=3, ship=True)
    trainer, averaging, recorder = _train(tmp_path, cfg)
    want = {n: torch.stack([w[n] for w in recorder.weights[-3:]]).mean(0) for n in recorder.weights[0]}
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n])  # the model ends holding the average


@pytest.mark.parametrize("method", ["ema", "last_k"])
def test_resume_is_exact(tmp_path, method):
    cfg = WeightAveragingConfig(method=method, decay=0.7, k=2)
    _, straight, _ = _train(tmp_path / "a", cfg)
    _, first, _ = _train(tmp_path / "b", cfg, stop_at=3)
    assert first.updates == 3 and (tmp_path / "b" / "ckpt" / "checkpoint-3" / STATE_FILE).is_file()
    _, resumed, _ = _train(tmp_path / "b", cfg, resume=str(tmp_path / "b" / "ckpt" / "checkpoint-3"))
    assert resumed.updates == straight.updates == 6
    a, b = straight.averaged_weights(), resumed.averaged_weights()
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_resume_without_the_saved_average_is_refused(tmp_path):
    cfg = WeightAveragingConfig()
    _train(tmp_path, cfg, stop_at=3)
    (tmp_path / "ckpt" / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(ValueError, match="cannot be restored"):
        _train(tmp_path, cfg, resume=str(tmp_path / "ckpt" / "checkpoint-3"))
    _train(tmp_path / "x", cfg, stop_at=3)
    with pytest.raises(ValueError, match="holds a 'ema' weight average"):
        _train(tmp_path / "x", WeightAveragingConfig(method="last_k"),
               resume=str(tmp_path / "x" / "ckpt" / "checkpoint-3"))
