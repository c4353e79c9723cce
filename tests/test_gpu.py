"""CUDA checks of the loss paths, opt in with HF_CPT_GPU_TESTS=1 (`bench/gpu_run.sh` runs them on a GPU machine;
elsewhere they are skipped). The 1B-scale agreement of the Liger, default and chunked paths is in
`bench/gpu_checks.py`; these are the quick, tiny-model versions."""

import pytest
import torch

from hf_cpt.import_utils import is_liger_available
from hf_cpt.liger import choose_loss
from hf_cpt.losses import chunked_linear_cross_entropy
from hf_cpt.testing import make_tiny_llama

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_full_logits_cross_entropy_on_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1000, 256, device="cuda", dtype=dtype, generator=g).requires_grad_()
    w = (0.05 * torch.randn(5003, 256, device="cuda", dtype=dtype, generator=g)).requires_grad_()
    t = torch.randint(0, 5003, (1000,), device="cuda", generator=g)
    t[::7] = -100
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), t)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    out = chunked_linear_cross_entropy(h, w, t, chunk_size=256)
    gh, gw = torch.autograd.grad(out, (h, w))
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5, atol=1e-5)  # both from the same logits
    # fp32: summation order only; bf16: both round the logits' gradient to bf16 for the backward products, in a
    # different order (2^-8 relative per element, far less over a whole tensor)
    bound = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((gh, ref_gh), (gw, ref_gw)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) <= bound


@pytest.mark.skipif(not is_liger_available(), reason="liger-kernel is not installed")
def test_choose_loss_picks_liger_on_cuda_and_a_trainer_step_runs_with_it(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_llama(512, hidden_size=64).to("cuda")
    assert choose_loss(model, "auto", "auto") == "liger"
    ids = torch.randint(0, 512, (8, 64)).tolist()
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, bf16=True,
                             use_liger_kernel=True, report_to="none", save_strategy="no", disable_tqdm=True,
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_chunked_loss_trainer_step_on_cuda_bf16(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_llama(512, hidden_size=64).to("cuda")
    assert choose_loss(model, "false", "true") == "chunked"
    ids = torch.randint(0, 512, (8, 64)).tolist()
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, bf16=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
