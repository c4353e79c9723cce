"""Forward + backward time and peak memory of the output head + cross-entropy alone: the full-logits loss the
HF models compute, Liger's fused linear cross-entropy, hf-cpt's chunked loss, and Apple's Cut Cross-Entropy.

    python bench/gpu_loss.py [--tokens 16384] [--hidden 2048] [--vocabs 128256,256000] [--repeats 5] [--json PATH]
    python bench/gpu_loss.py --tiny      # CPU smoke shape

Inputs are bf16 on CUDA (fp32 on the CPU): hidden states `(tokens, hidden)` and a head `(vocab, hidden)`, both
requiring gradients, random targets. Methods:

    hf        logits = h @ W^T, upcast to fp32, `F.cross_entropy` (what `ForCausalLMLoss` does after its shift)
    liger     `liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`      (CUDA + liger-kernel)
    chunked   `hf_cpt.losses.chunked_linear_cross_entropy` (chunk size: its auto rule)
    cce       `cut_cross_entropy.linear_cross_entropy` (default `impl="cce"`)      (CUDA + cut-cross-entropy)

Per method: median ms of `--repeats` forward+backward passes after one untimed (Triton compiles there), peak GiB
above the inputs (`torch.cuda.max_memory_allocated` minus what was allocated before; the head's gradient, the
size of the head, is part of every method's peak), and the loss's distance to `hf`'s. A method whose package or
device is missing is skipped with the reason. One process runs every method, one after another, each after an
`empty_cache` and a fresh peak counter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_common import device_line, use_cuda, write_json  # noqa: E402
from hf_cpt.import_utils import is_available  # noqa: E402
from hf_cpt.losses import chunked_linear_cross_entropy  # noqa: E402


def hf_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy((h @ w.t()).float(), t)


def liger_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, w, t)


def chunked_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return chunked_linear_cross_entropy(h, w, t)


def cce_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, t)


# name -> (loss, import name needed, needs CUDA)
METHODS: dict[str, tuple[Callable[..., torch.Tensor], str | None, bool]] = {
    "hf": (hf_loss, None, False),
    "liger": (liger_loss, "liger_kernel", True),
    "chunked": (chunked_loss, None, False),
    "cce": (cce_loss, "cut_cross_entropy", True),
}


def skip_reason(name: str, cuda: bool) -> str | None:
    _, package, needs_cuda = METHODS[name]
    if needs_cuda and not cuda:
        return "needs CUDA (Triton kernels)"
    if package is not None and not is_available(package):
        return f"`{package}` is not installed"
    return None


def measure(name: str, tokens: int, hidden: int, vocab: int, repeats: int, cuda: bool) -> dict[str, Any]:
    """Forward + backward of method `name` on fresh seeded inputs; time and peak memory above the inputs."""
    loss_fn = METHODS[name][0]
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    times, peak, loss = [], None, None
    for i in range(repeats + 1):
        h.grad = w.grad = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = loss_fn(h, w, t)
        out.backward()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first pass compiles kernels
            times.append(time.perf_counter() - t0)
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        loss = float(out.detach())
        del out
    return {"ms": 1e3 * statistics.median(times), "peak_gib": peak, "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke shape: 256 tokens, hidden 64, vocab 1024/2048")
    p.add_argument("--tokens", type=int, default=None, help="rows of hidden states (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 2048, Llama-3.2-1B)")
    p.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes (default 128256,256000)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed passes per method (after one untimed)")
    p.add_argument("--json", default=None, help="write the numbers here (rewritten after each measurement)")
    a = p.parse_args()
    tokens, hidden = a.tokens or (256 if a.tiny else 16384), a.hidden or (64 if a.tiny else 2048)
    vocabs = [int(v) for v in (a.vocabs or ("1024,2048" if a.tiny else "128256,256000")).split(",")]
    cuda = use_cuda(a.tiny)
    print(f"device: {device_line()}; {tokens} tokens, hidden {hidden}, {'bf16' if cuda else 'fp32'}, forward+backward,"
          f" median of {a.repeats}", flush=True)
    results: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "dtype": "bf16" if cuda else "fp32", "runs": {}}
    for vocab in vocabs:
        rows = results["runs"][f"vocab{vocab}"] = {}
        for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
            why = skip_reason(name, cuda)
            if why is not None:
                rows[name] = {"skipped": why}
                print(f"  vocab {vocab:>6} {name:<8} skipped: {why}", flush=True)
                continue
            try:
                r = rows[name] = measure(name, tokens, hidden, vocab, a.repeats, cuda)
            except Exception as e:  # one method failing (OOM, an API change) must not cost the others
                traceback.print_exc()
                rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                print(f"  vocab {vocab:>6} {name:<8} FAILED: {rows[name]['error']}", flush=True)
                continue
            if name != "hf" and "loss" in rows.get("hf", {}):
                r["loss_diff_vs_hf"] = abs(r["loss"] - rows["hf"]["loss"])
            peak = f"{r['peak_gib']:7.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
            print(f"  vocab {vocab:>6} {name:<8} {r['ms']:9.2f} ms  peak {peak}  loss {r['loss']:.5f}"
                  f"  |dloss vs hf| {r.get('loss_diff_vs_hf', 0.0):.1e}", flush=True)
            if a.json:
                write_json(a.json, results)
    if a.json:
        write_json(a.json, results)


if __name__ == "__main__":
    main()
