"""Peak memory and time of the naive full-logits cross-entropy vs hf-cpt's chunked loss, on CPU.

    python bench/loss_memory.py [--tokens 2048] [--hidden 1024] [--vocabs 32768,131072,262144] [--chunk 0]

Each measurement runs in a fresh subprocess (forward + backward of head + loss, fp32) and reports the peak
resident memory above the inputs (`ru_maxrss`), so allocations of one run cannot hide in another's. Prints the
ratios naive / chunked for each vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from hf_cpt.losses import chunked_linear_cross_entropy
method, n, h, v, chunk = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.manual_seed(0)
# filled in place: no temporary may raise the peak (ru_maxrss) before the baseline is taken
hidden = torch.empty(n, h).normal_().requires_grad_()
weight = torch.empty(v, h).normal_(0.0, 0.02).requires_grad_()
target = torch.randint(0, v, (n,))
# touch the gradient buffers the optimizer would hold anyway, so both methods start from the same footprint
hidden.grad = torch.empty_like(hidden).fill_(0.0); weight.grad = torch.empty_like(weight).fill_(0.0)  # touched pages
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "naive":
    loss = torch.nn.functional.cross_entropy(hidden @ weight.t(), target)
else:
    loss = chunked_linear_cross_entropy(hidden, weight, target, chunk_size=chunk or None)
loss.backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - base) / 1024, "seconds": dt, "loss": float(loss)}))
"""


def measure(method: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), method, str(tokens), str(hidden), str(vocab),
                          str(chunk)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocabs", default="32768,131072,262144")
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk; 0: auto (hf-cpt's default)")
    a = p.parse_args()
    print(f"{a.tokens} tokens, hidden {a.hidden}, fp32, forward+backward, chunk {a.chunk or 'auto'}, CPU x{os.cpu_count()}")
    print(f"{'vocab':>8} {'naive MiB':>10} {'chunked MiB':>12} {'mem ratio':>10} {'naive s':>8} {'chunked s':>10} "
          f"{'time ratio':>11} {'|dloss|':>9}")
    for v in (int(x) for x in a.vocabs.split(",")):
        n = measure("naive", a.tokens, a.hidden, v, a.chunk)
        c = measure("chunked", a.tokens, a.hidden, v, a.chunk)
        print(f"{v:8d} {n['peak_mib']:10.0f} {c['peak_mib']:12.0f} {n['peak_mib'] / max(c['peak_mib'], 1):9.1f}x "
              f"{n['seconds']:8.2f} {c['seconds']:10.2f} {c['seconds'] / n['seconds']:10.2f}x "
              f"{abs(n['loss'] - c['loss']):9.1e}", flush=True)


if __name__ == "__main__":
    main()
