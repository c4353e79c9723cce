"""Correctness of hf-cpt's losses on CUDA in bf16: the loss and gradients of the Liger, hf-cpt default and chunked
paths on one batch, and the distillation KL term with and without Liger's kernels, against an fp32 reference.

    python bench/gpu_checks.py [--shape 1b] [--seq 1024] [--batch 2] [--json PATH]
    python bench/gpu_checks.py --tiny      # CPU smoke shape (the Liger checks are skipped there)

One Llama of the given shape (random weights, vocabulary 128256; tiny: 1024) and one batch of random tokens. The
reference is the plain HF model in fp32. Every other path runs the Trainer's numerics: bf16 weights under bf16
autocast (`bf16=True`):

    a  plain HF (the model's own loss)                          the yardstick: bf16's own rounding on this batch
    b  Liger as `Trainer(use_liger_kernel=True)` applies it    (RMSNorm, RoPE, SwiGLU, fused linear CE)
    c  hf-cpt's default: whatever `choose_loss(model)` picks (Liger on CUDA, so c must equal b)
    d  hf-cpt's chunked loss forced (`apply_chunked_loss`)

Each path's error against fp32: |loss - loss_ref| and, over five parameters (tied embedding/head, first q_proj, a
middle down_proj, last input norm, final norm), the largest relative L2 error of the gradient ||g - g_ref|| /
||g_ref||.

Tolerance, and why: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3), and every path rounds the same
activations, only in a different order and in differently fused kernels. The plain HF model in bf16 (a) measures
what that rounding costs on this very model and batch, so a correct b, c or d must come within twice a's error
plus a floor of about one roundoff: loss <= 2 err_a + 2e-3 nats, gradients <= 2 err_a + 1e-2 relative. A wrong
kernel (a missing term, a bad scale, a dropped gradient path) is off by far more: O(1) relative.

Distillation replay (`train.distill`, the top-k KL term inside the chunked loss; `choose_loss` turns Liger's loss
off for it, but Liger's other kernels could run with it): base targets are random peaked top-64 distributions,
and the KL term is the chunked loss with targets minus the loss without. (i) fp32: the chunked KL term equals
`hf_cpt.base_targets.topk_kl` on the full fp32 logits (rel. 1e-4: both are fp32, only summation order differs); (ii)
bf16 without Liger and (iii) bf16 with Liger's RMSNorm/RoPE/SwiGLU patched in (its fused CE off, the chunked loss
on): each against (i), (iii) within 2 err_(ii) + 2e-3 relative.

Liger patches module globals (RoPE, the RMSNorm class), so every non-Liger computation runs before the first
Liger one. Prints one line per check, PASS or FAIL, and `--json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_common import LLAMA3_VOCAB, build_llama, device_line, use_cuda, write_json  # noqa: E402
from hf_cpt.base_targets import topk_kl, topk_targets  # noqa: E402
from hf_cpt.import_utils import is_liger_available  # noqa: E402
from hf_cpt.liger import choose_loss  # noqa: E402
from hf_cpt.losses import apply_chunked_loss, remove_chunked_loss  # noqa: E402

LOSS_FLOOR, GRAD_FLOOR, KL_FP32_RTOL, KL_FLOOR = 2e-3, 1e-2, 1e-4, 2e-3


def watched(model: Any) -> dict[str, torch.Tensor]:
    """The parameters whose gradients are compared."""
    layers = model.model.layers
    return {"embed/head": model.get_input_embeddings().weight, "layers.0.q_proj": layers[0].self_attn.q_proj.weight,
            f"layers.{len(layers) // 2}.down_proj": layers[len(layers) // 2].mlp.down_proj.weight,
            f"layers.{len(layers) - 1}.input_norm": layers[-1].input_layernorm.weight,
            "norm": model.model.norm.weight}


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor], low: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss of `model(**batch)` and the watched gradients (fp32 copies); `low`: bf16 autocast as the Trainer."""
    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=low):
        loss = model(**batch).loss
    loss.backward()
    grads = {k: p.grad.detach().float().clone() for k, p in watched(model).items()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def errors(loss: float, grads: dict[str, torch.Tensor], ref: tuple[float, dict[str, torch.Tensor]]) -> dict[str, Any]:
    rel = {k: float((g - ref[1][k]).norm() / ref[1][k].norm().clamp(min=1e-30)) for k, g in grads.items()}
    return {"loss": loss, "loss_err": abs(loss - ref[0]), "grad_rel_err": max(rel.values()), "grad_rel_errs": rel}


def low_copy(model32: Any) -> Any:
    """A bf16 copy of the fp32 model (the same weights, rounded)."""
    return copy.deepcopy(model32).to(torch.bfloat16)


def apply_liger(model: Any, **kwargs: Any) -> None:
    """Liger on `model` the way the Trainer applies `use_liger_kernel=True`."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **kwargs)


def verdict(name: str, err: dict[str, Any], yard: dict[str, Any]) -> dict[str, Any]:
    loss_tol, grad_tol = 2 * yard["loss_err"] + LOSS_FLOOR, 2 * yard["grad_rel_err"] + GRAD_FLOOR
    ok = err["loss_err"] <= loss_tol and err["grad_rel_err"] <= grad_tol
    print(f"  {'PASS' if ok else 'FAIL'} {name:<22} |dloss| {err['loss_err']:.2e} (tol {loss_tol:.2e})  grad rel "
          f"{err['grad_rel_err']:.2e} (tol {grad_tol:.2e})", flush=True)
    return {**err, "loss_tol": loss_tol, "grad_tol": grad_tol, "pass": ok}


def distill_targets(batch: dict[str, torch.Tensor], vocab: int, k: int = 64) -> dict[str, torch.Tensor]:
    """Random peaked base distributions (top-k of logits with std 4), so the KL is O(1), not rounding noise."""
    ids = batch["input_ids"]
    g = torch.Generator(device=ids.device).manual_seed(1)
    top_ids, top_lp = topk_targets(4.0 * torch.randn(*ids.shape, vocab, device=ids.device, generator=g), k)
    return {"base_topk_ids": top_ids, "base_topk_logprobs": top_lp}


def kl_term(model: Any, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], low: bool) -> float:
    """The distillation term of the chunked loss: loss with base targets minus loss without (same divisor)."""
    with torch.no_grad(), torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=low):
        return float(model(**batch, **targets).loss) - float(model(**batch).loss)


def reference_kl(model32: Any, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> float:
    """Mean top-k KL over the shifted positions from the full fp32 logits (what the chunked term estimates)."""
    with torch.no_grad():
        logits = model32(input_ids=batch["input_ids"]).logits[:, :-1].float()
    return float(topk_kl(logits, targets["base_topk_ids"][:, :-1], targets["base_topk_logprobs"][:, :-1]))


def run_checks(a: Any) -> dict[str, Any]:
    cuda = use_cuda(a.tiny)
    device = "cuda" if cuda else "cpu"
    liger = cuda and is_liger_available()
    model32 = build_llama(a.shape, a.vocab, a.seq, torch.float32, device)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=device, generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    print(f"device: {device_line()}; shape {a.shape}, vocab {a.vocab}, batch {a.batch} x {a.seq}", flush=True)
    ref = loss_and_grads(model32, batch, low=False)
    checks: dict[str, Any] = {}
    # everything without Liger first: it patches module globals
    yard = checks["a_hf_bf16"] = errors(*loss_and_grads(low_copy(model32), batch, low=True), ref)
    print(f"  ---- (a) plain HF bf16 vs fp32: |dloss| {yard['loss_err']:.2e}, grad rel {yard['grad_rel_err']:.2e} "
          "(the yardstick)", flush=True)
    m = apply_chunked_loss(low_copy(model32))
    checks["d_chunked"] = verdict("(d) chunked", errors(*loss_and_grads(m, batch, low=True), ref), yard)
    targets = distill_targets(batch, a.vocab)
    checks.update(check_distill_plain(model32, m, batch, targets))
    del m
    c = low_copy(model32)
    mode = choose_loss(c, "auto", "auto")  # applies the chunked loss itself; Liger is the Trainer's to apply
    if mode != "liger":
        checks["c_hfcpt_default"] = verdict(f"(c) hf-cpt default ({mode})",
                                            errors(*loss_and_grads(c, batch, low=True), ref), yard)
        checks["c_hfcpt_default"]["loss_mode"] = mode
    if not liger:
        why = "needs CUDA" if not cuda else "liger-kernel is not installed"
        checks["b_liger"] = checks["distill_bf16_liger"] = {"skipped": why}
        print(f"  skip (b) Trainer + Liger and distill KL under Liger: {why}", flush=True)
        return {"device": device_line(), "liger": liger, "checks": checks}
    b = low_copy(model32)
    apply_liger(b)
    checks["b_liger"] = verdict("(b) Trainer + Liger", errors(*loss_and_grads(b, batch, low=True), ref), yard)
    del b
    if mode == "liger":  # as the Trainer does with `use_liger_kernel=True`
        apply_liger(c)
        r = checks["c_hfcpt_default"] = verdict("(c) hf-cpt default (liger)",
                                                errors(*loss_and_grads(c, batch, low=True), ref), yard)
        r["loss_mode"], r["same_as_b"] = mode, r["loss"] == checks["b_liger"]["loss"]
    del c
    checks["distill_bf16_liger"] = check_distill_liger(model32, batch, targets, checks)
    return {"device": device_line(), "liger": liger, "checks": checks}


def check_distill_plain(model32: Any, chunked_bf16: Any, batch: dict[str, torch.Tensor],
                        targets: dict[str, torch.Tensor]) -> dict[str, Any]:
    """(i) the chunked KL term in fp32 against `topk_kl` on full logits; (ii) the same term in bf16."""
    kl_ref = reference_kl(model32, batch, targets)
    kl32 = kl_term(apply_chunked_loss(model32), batch, targets, low=False)
    remove_chunked_loss(model32)
    rel32 = abs(kl32 - kl_ref) / abs(kl_ref)
    ok = rel32 <= KL_FP32_RTOL
    print(f"  {'PASS' if ok else 'FAIL'} distill KL fp32        chunked {kl32:.6f} vs topk_kl {kl_ref:.6f} (rel "
          f"{rel32:.1e}, tol {KL_FP32_RTOL:.0e})", flush=True)
    kl_low = kl_term(chunked_bf16, batch, targets, low=True)
    err = abs(kl_low - kl_ref) / abs(kl_ref)
    print(f"  ---- distill KL bf16, no Liger: {kl_low:.6f}, rel err {err:.1e} (the yardstick)", flush=True)
    return {"distill_fp32": {"chunked": kl32, "topk_kl": kl_ref, "rel_err": rel32, "pass": ok},
            "distill_bf16": {"kl": kl_low, "rel_err": err}}


def check_distill_liger(model32: Any, batch: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                        checks: dict[str, Any]) -> dict[str, Any]:
    """(iii) the KL term in bf16 with Liger's RMSNorm/RoPE/SwiGLU in the model and the chunked loss on top."""
    m = low_copy(model32)
    apply_liger(m, fused_linear_cross_entropy=False)
    apply_chunked_loss(m)
    kl = kl_term(m, batch, targets, low=True)
    ref, plain = checks["distill_fp32"]["topk_kl"], checks["distill_bf16"]
    err = abs(kl - ref) / abs(ref)
    tol = 2 * plain["rel_err"] + KL_FLOOR
    ok = err <= tol
    print(f"  {'PASS' if ok else 'FAIL'} distill KL bf16 Liger  {kl:.6f}: rel err {err:.1e} (tol {tol:.1e}); "
          f"without Liger {plain['kl']:.6f}", flush=True)
    return {"kl": kl, "rel_err": err, "tol": tol, "pass": ok, "diff_vs_no_liger": abs(kl - plain["kl"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke shape: hidden 64, 2 layers, vocab 1024, 2 x 64")
    p.add_argument("--shape", default=None, choices=["1b", "3b", "tiny"], help="model shape (default 1b)")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size (default {LLAMA3_VOCAB}, tiny 1024)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, tiny 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences in the batch")
    p.add_argument("--json", default=None, help="write the numbers here")
    a = p.parse_args()
    a.shape = a.shape or ("tiny" if a.tiny else "1b")
    a.vocab = a.vocab or (1024 if a.tiny else LLAMA3_VOCAB)
    a.seq = a.seq or (64 if a.tiny else 1024)
    result = {"shape": a.shape, "vocab": a.vocab, "seq": a.seq, "batch": a.batch, **run_checks(a)}
    failed = [k for k, c in result["checks"].items() if c.get("pass") is False]
    result["failed"] = failed
    print(f"checks: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    if a.json:
        write_json(a.json, result)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
