"""The controlled CPT lab: pretrain a small Llama on a known general corpus, continually pretrain it on a domain
corpus across replay ratios, budgets (10x) and schedules, then test the learning-dynamics law and the CMR law on it.

    python bench/cpt_lab.py                       # the whole lab (cached under --cache; reruns take seconds)
    python bench/cpt_lab.py --smollm2             # shorter grid on the embedded SmolLM2 via `run_cpt`
    python bench/cpt_lab.py --out docs/cpt_lab    # where the table (JSON) and the PNG go
    python bench/cpt_lab.py --replicates 1        # skip the data-order replicates of the held-out WSD runs
    python bench/cpt_lab.py --packing concat      # the block layout before document packing (issue 29)

Lab (`--smollm2` off): a byte-level BPE tokenizer and a Llama built from config (random init, seed 0) are
pretrained from scratch on the KJV (the general corpus shipped in hf_cpt/data/kjv, cosine schedule to 10% of its
peak; 5% of its blocks are Python docs held apart from the CPT data, as web text holds some code), so the model's
true pretraining distribution is known and its held-out split is the general evaluation set.
That checkpoint is then continually pretrained on the Python docs (hf_cpt/data/python-docs) with a fresh AdamW at
each domain share p = 1 - replay_ratio, with constant / cosine / WSD schedules (linear warmup from 0), budgets of
40, 120 and 400 steps. Every run is deterministic (fixed seeds, fixed block order per source; the mixing is the
library's credit allocation) and is cached as JSON keyed by its settings, so a rerun only refits.

Checks (the goals of issue 23):
1. Learning-dynamics law (hf_cpt.dynamics): fit on the constant + cosine runs, predict the held-out WSD runs'
   general and domain curves; goal max |error| <= 0.02 nats over eval steps. Also the harder split: fit on pilots
   of <= 120 steps only and predict the 400-step WSD runs.
2. CMR (hf_cpt.mixers.cmr): fit on the constant runs' evaluations at <= 10% of the largest budget (40 of 400
   steps; a constant-LR run's prefix is exactly the shorter pilot run), predict the CMR at 400 steps; compare with
   the CMR measured by the sweep at 400 steps (interpolated between the swept domain shares); goal +-0.05.
3. Data-order replicates (`--replicates N`, default 3): the 12 held-out WSD runs again with N - 1 other CPT data
   orders (same pretrained model, same eval sets), so the run-to-run noise of a single data order is measured, not
   assumed: the seed-to-seed spread, the law's error against each order and against the order-averaged curve.
   Order 0's WSD runs share their stable phase (the first 80%) with the constant pilots exactly (same data, same
   LRs), so only the other orders hold out that phase too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

LAB_VERSION = 2


@dataclass(frozen=True)
class LabConfig:
    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    block: int = 64
    batch: int = 16
    pt_steps: int = 1000
    pt_lr: float = 3e-3
    pt_warmup: int = 100
    pt_min_ratio: float = 0.1
    pt_domain_share: float = 0.05
    cpt_lr: float = 1e-3
    cpt_warmup: int = 10
    wsd_decay: float = 0.2
    eval_blocks: int = 128
    seed: int = 0
    packing: str = "documents"  # hf_cpt's block layout (`data.packing`); `concat`: the lab before issue 29


def _lab_key(lab: LabConfig) -> dict:
    """The lab settings as cached: `packing` only when not `concat`, so the concat-era caches keep their keys."""
    out = asdict(lab)
    if lab.packing == "concat":
        out.pop("packing")
    return out


@dataclass(frozen=True)
class RunSpec:
    schedule: str  # constant | cosine | wsd
    steps: int
    domain_share: float
    peak_lr: float
    order_seed: int = 0  # 0: the lab's CPT data order; k > 0: both CPT sources re-permuted with seed k


def _spec_key(spec: RunSpec) -> dict:
    """The spec as cached: `order_seed` only when nonzero, so the order-0 runs keep their cache keys."""
    out = asdict(spec)
    if not spec.order_seed:
        out.pop("order_seed")
    return out


# --- data and model ------------------------------------------------------------------------------------------
def _tokenizer(lab: LabConfig, cache: Path):
    from transformers import PreTrainedTokenizerFast

    from hf_cpt.testing import read_embedded, train_bpe_tokenizer

    path = cache / f"tokenizer-{lab.vocab_size}"
    if not (path / "tokenizer.json").exists():
        texts = read_embedded("kjv") + read_embedded("python-docs")
        tok = train_bpe_tokenizer(texts, lab.vocab_size)
        tok.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def _blocks(tok, name: str, split: str, block: int, packing: str) -> dict:
    """The split as `block`-token blocks in hf_cpt's layout (`hf_cpt.mixers.packing.pack_documents`): tensors
    `input_ids`, `labels` and, for `documents`, `position_ids` restarting at every document."""
    import torch

    from hf_cpt.mixers.packing import bos_for, pack_documents
    from hf_cpt.testing import read_embedded

    docs = [tok(text)["input_ids"] for text in read_embedded(name, split)]
    blocks = pack_documents(docs, block, bos_for(tok), tok.eos_token_id, packing)
    keys = ("input_ids", "labels") + (("position_ids",) if packing == "documents" else ())
    return {k: torch.tensor([b[k] for b in blocks]) for k in keys}


def _rows(blocks: dict, idx) -> dict:
    return {k: v[idx] for k, v in blocks.items()}


def _forward(model, batch: dict):
    """Logits of a batch; document-packed batches go with their positions and no cache (per-document attention)."""
    extra = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {}
    return model(input_ids=batch["input_ids"], **extra).logits


class LabData:
    """Token blocks per source; each source is read in a fixed seeded order (cycling when exhausted)."""

    def __init__(self, lab: LabConfig, cache: Path) -> None:
        import torch

        tok = self.tokenizer = _tokenizer(lab, cache)
        self.train = {"general": _blocks(tok, "kjv", "train", lab.block, lab.packing),
                      "domain": _blocks(tok, "python-docs", "train", lab.block, lab.packing)}
        self.eval = {"general": _rows(_blocks(tok, "kjv", "validation", lab.block, lab.packing),
                                      slice(0, lab.eval_blocks)),
                     "domain": _rows(_blocks(tok, "python-docs", "validation", lab.block, lab.packing),
                                     slice(0, lab.eval_blocks))}
        g = torch.Generator().manual_seed(lab.seed)
        order = {k: torch.randperm(len(v["input_ids"]), generator=g) for k, v in self.train.items()}
        # pretraining sees a little code (as web text does): a held-apart 10% of the domain blocks
        cut = len(order["domain"]) // 10
        order["domain_pt"] = order["domain"][:cut]
        order["domain"] = order["domain"][cut:]
        self.train["domain_pt"] = self.train["domain"]
        self.base_order = order
        self.order = dict(order)
        self.pos = {k: 0 for k in self.order}

    def reset(self, offsets: dict[str, int] | None = None, order_seed: int = 0) -> None:
        """Rewind to `offsets`; `order_seed` k > 0 re-permutes the CPT sources (general, domain: the same blocks,
        another order; the pretraining's `domain_pt` blocks stay held apart), 0 restores the lab's order."""
        import torch

        self.order = dict(self.base_order)
        if order_seed:
            g = torch.Generator().manual_seed(1_000_003 * order_seed)
            for k in ("general", "domain"):
                self.order[k] = self.base_order[k][torch.randperm(len(self.base_order[k]), generator=g)]
        self.pos = dict(offsets or {k: 0 for k in self.order})

    def take(self, source: str, n: int):
        idx = [(self.pos[source] + i) % len(self.order[source]) for i in range(n)]
        self.pos[source] += n
        return _rows(self.train[source], self.order[source][idx])


def _model(lab: LabConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(lab.seed)
    cfg = LlamaConfig(vocab_size=lab.vocab_size, hidden_size=lab.hidden, intermediate_size=4 * lab.hidden,
                      num_hidden_layers=lab.layers, num_attention_heads=lab.heads, num_key_value_heads=lab.heads,
                      max_position_embeddings=lab.block, tie_word_embeddings=True, eos_token_id=0,
                      pad_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def _eval(model, blocks, batch: int = 64) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks["input_ids"]), batch):
            x = _rows(blocks, slice(i, i + batch))
            logits = _forward(model, x)[:, :-1].float()
            target = x["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     reduction="sum", ignore_index=-100)
            total += float(loss)
            count += int((target != -100).sum())
    model.train()
    return total / count


def lab_lrs(spec: RunSpec, lab: LabConfig) -> np.ndarray:
    """The LR at each of the run's optimizer steps (hf_cpt's rewarm schedule functions)."""
    from hf_cpt.callbacks.rewarm import RewarmConfig, lr_multiplier

    warm = min(lab.cpt_warmup, spec.steps // 4)
    cfg = {"constant": RewarmConfig(schedule="constant", warmup_steps=warm),
           "cosine": RewarmConfig(schedule="rewarm", warmup_steps=warm, decay="cosine", min_lr_ratio=0.1),
           "wsd": RewarmConfig(schedule="wsd", warmup_steps=warm, decay="linear", min_lr_ratio=0.1,
                               decay_steps=max(1, round(lab.wsd_decay * spec.steps)))}[spec.schedule]
    return np.array([spec.peak_lr * lr_multiplier(s, cfg, spec.steps) for s in range(spec.steps)])


def eval_steps(spec: RunSpec) -> list[int]:
    """Every steps/20 updates, plus every 4 up to 40 for the long runs (the CMR pilots at <= 10% of 400)."""
    every = max(1, spec.steps // 20)
    steps = set(range(0, spec.steps + 1, every)) | {spec.steps}
    if spec.steps >= 400:
        steps |= set(range(0, 41, 4))
    return sorted(steps)


def _train(model, data: LabData, lab: LabConfig, lrs: np.ndarray, mix: dict[str, float],
           evals: list[int]) -> list[dict]:
    """Train with AdamW at the given per-step LRs, each batch's blocks split between sources by `mix` (credit
    allocation, exact to one block), evaluating both held-out sets at `evals`."""
    import torch

    from hf_cpt.mixers.core import allocate_shares

    opt = torch.optim.AdamW(model.parameters(), lr=float(lrs[0]) if len(lrs) else 0.0, betas=(0.9, 0.95),
                            weight_decay=0.1)
    credits: dict[str, float] = {}
    history = []
    wanted = set(evals)
    for step in range(len(lrs) + 1):
        if step in wanted:
            history.append({"step": step, "general_loss": _eval(model, data.eval["general"]),
                            "domain_loss": _eval(model, data.eval["domain"])})
        if step == len(lrs):
            break
        counts, credits = allocate_shares(credits, mix, lab.batch)
        parts = [data.take(s, n) for s, n in counts.items() if n]
        x = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for group in opt.param_groups:
            group["lr"] = float(lrs[step])
        extra = {"position_ids": x["position_ids"], "use_cache": False} if "position_ids" in x else {}
        loss = model(input_ids=x["input_ids"], labels=x["labels"], **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(lab: LabConfig, data: LabData, cache: Path):
    import torch

    path = cache / f"pretrained-{_key([LAB_VERSION, _lab_key(lab)])}.pt"
    model = _model(lab)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, json.loads(path.with_suffix(".json").read_text())
    from hf_cpt.callbacks.rewarm import RewarmConfig, lr_multiplier

    cfg = RewarmConfig(schedule="rewarm", warmup_steps=lab.pt_warmup, decay="cosine", min_lr_ratio=lab.pt_min_ratio)
    lrs = np.array([lab.pt_lr * lr_multiplier(s, cfg, lab.pt_steps) for s in range(lab.pt_steps)])
    t0 = time.perf_counter()
    data.reset()
    mix = {"general": 1.0 - lab.pt_domain_share, "domain_pt": lab.pt_domain_share}
    hist = _train(model, data, lab, lrs, mix, [0, lab.pt_steps // 2, lab.pt_steps])
    info = {"history": hist, "forward_area": float(lrs.sum()), "final_lr": float(lrs[-1]),
            "general_blocks_used": data.pos["general"], "seconds": time.perf_counter() - t0}
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    path.with_suffix(".json").write_text(json.dumps(info))
    tmp.replace(path)
    return model, info


def run(spec: RunSpec, lab: LabConfig, data: LabData, base_state: dict, pt_info: dict, cache: Path) -> dict:
    """One CPT run (cached): its LRs and evaluation history."""
    import torch

    order = f"-o{spec.order_seed}" if spec.order_seed else ""
    path = cache / "runs" / f"{spec.schedule}-{spec.steps}-p{spec.domain_share:g}-lr{spec.peak_lr:g}{order}-" \
                            f"{_key([LAB_VERSION, _lab_key(lab), _spec_key(spec)])}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = _model(lab)
    model.load_state_dict(base_state)
    torch.manual_seed(lab.seed + 1)
    # CPT reads general text the pretraining has not reached yet (replay of the same distribution), domain from 0
    data.reset({"general": pt_info["general_blocks_used"], "domain": 0, "domain_pt": 0}, spec.order_seed)
    lrs = lab_lrs(spec, lab)
    t0 = time.perf_counter()
    hist = _train(model, data, lab, lrs, {"domain": spec.domain_share, "general": 1.0 - spec.domain_share},
                  eval_steps(spec))
    out = {"spec": _spec_key(spec), "lrs": lrs.tolist(), "history": hist, "seconds": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


SHARES = (1.0, 0.75, 0.5, 0.25)  # domain shares of every schedule x budget
CMR_SHARES = (0.9, 0.6, 0.4, 0.1)  # extra constant 400-step runs: a finer sweep for the measured CMR
BUDGETS = (40, 120, 400)


def grid(lab: LabConfig) -> list[RunSpec]:
    specs = [RunSpec("constant", BUDGETS[-1], p, lab.cpt_lr) for p in SHARES + CMR_SHARES]
    specs += [RunSpec(s, b, p, lab.cpt_lr) for s in ("cosine", "wsd") for b in BUDGETS for p in SHARES]
    return specs


def replicate_grid(lab: LabConfig, replicates: int) -> list[RunSpec]:
    """The held-out WSD runs with the CPT data orders 1 .. replicates - 1 (order 0 is in `grid`)."""
    return [RunSpec("wsd", b, p, lab.cpt_lr, order_seed=k) for k in range(1, replicates)
            for b in BUDGETS for p in SHARES]


def run_lab(lab: LabConfig, cache: Path, replicates: int = 1) -> tuple[dict, list[dict], list[dict]]:
    import torch

    torch.set_num_threads(int(os.environ.get("LAB_THREADS", "1")))
    cache.mkdir(parents=True, exist_ok=True)
    data = LabData(lab, cache)
    model, pt_info = pretrain(lab, data, cache)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    specs = grid(lab) + replicate_grid(lab, replicates)
    out = []
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        out.append(run(spec, lab, data, base, pt_info, cache))
        print(f"[{i + 1}/{len(specs)}] {spec} {time.perf_counter() - t0:.1f} s", flush=True)
    n = len(grid(lab))
    return pt_info, out[:n], out[n:]


# --- analysis ----------------------------------------------------------------------------------------------------
def as_pilot(r: dict, upto: int | None = None):
    from hf_cpt.dynamics import PilotCurve

    spec = r["spec"]
    rows = [h for h in r["history"] if upto is None or h["step"] <= upto]
    lrs = r["lrs"] if upto is None else r["lrs"][:upto]
    return PilotCurve(name=f"{spec['schedule']}-{len(lrs)}-p{spec['domain_share']:g}", schedule=spec["schedule"],
                      lrs=tuple(lrs), domain_share=spec["domain_share"], steps=tuple(h["step"] for h in rows),
                      general=tuple(h["general_loss"] for h in rows), domain=tuple(h["domain_loss"] for h in rows))


def heldout_errors(fit, runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        p = as_pilot(r)
        g, d = fit.predict(p.lrs, p.domain_share, p.steps)
        out.append({"run": p.name, "steps": len(p.lrs), "domain_share": p.domain_share,
                    "general_max_err": float(np.abs(g - np.array(p.general)).max()),
                    "domain_max_err": float(np.abs(d - np.array(p.domain)).max()),
                    "general_end_err": float(g[-1] - p.general[-1]), "domain_end_err": float(d[-1] - p.domain[-1]),
                    "general_rmse": float(np.sqrt(np.mean((g - np.array(p.general)) ** 2))),
                    "domain_rmse": float(np.sqrt(np.mean((d - np.array(p.domain)) ** 2)))})
    return out


def _pilots_upto(main: list[dict], steps: int | None) -> list:
    """Constant runs cut at `steps` (a constant-LR run's prefix is the shorter run) and cosine runs <= `steps`."""
    return ([as_pilot(r, steps) for r in main if r["spec"]["schedule"] == "constant"]
            + [as_pilot(r) for r in main if r["spec"]["schedule"] == "cosine"
               and (steps is None or r["spec"]["steps"] <= steps)])


def dynamics_checks(lab: LabConfig, pt_info: dict, runs: list[dict]) -> dict:
    from hf_cpt.dynamics import fit_dynamics

    known = {"pretrain_area": pt_info["forward_area"] / lab.cpt_lr, "lr_before": pt_info["final_lr"],
             "lr_unit": lab.cpt_lr}
    fitted_area = {k: v for k, v in known.items() if k != "pretrain_area"}
    main = [r for r in runs if r["spec"]["domain_share"] in SHARES]
    wsd = [r for r in main if r["spec"]["schedule"] == "wsd"]
    cases = [
        # the paper's protocol: constant + cosine runs of every length, predict the WSD runs
        ("constant+cosine, all lengths", "per ratio, S_pt known", _pilots_upto(main, None), known, False),
        ("constant+cosine, all lengths", "per ratio, S_pt fitted", _pilots_upto(main, None), fitted_area, False),
        ("constant+cosine, all lengths", "shared curve, S_pt known", _pilots_upto(main, None), known, True),
        ("pilots <= 120 steps", "per ratio, S_pt known", _pilots_upto(main, 120), known, False),
        ("pilots <= 40 steps (10%)", "per ratio, S_pt known", _pilots_upto(main, 40), known, False),
        # the floor: the law fitted to every run, the WSD runs included (what no prediction can beat)
        ("every run incl. WSD (in-sample floor)", "per ratio, S_pt known", [as_pilot(r) for r in main], known,
         False),
    ]
    out = {}
    for split, variant, pilots, extra, shared in cases:
        t0 = time.perf_counter()
        fit = fit_dynamics(pilots, shared_curve=shared, **extra)
        errs = heldout_errors(fit, wsd)
        out[f"{split} | {variant}"] = {
            "pilots": len(pilots), "fit_seconds": time.perf_counter() - t0, "momentum": [law.momentum for law in fit.laws],
            "rmse_general": fit.rmse_general, "rmse_domain": fit.rmse_domain, "at_bounds": fit.at_bounds,
            "heldout": errs, "max_general": max(e["general_max_err"] for e in errs),
            "max_domain": max(e["domain_max_err"] for e in errs),
            "max_general_replay": max(e["general_max_err"] for e in errs if e["domain_share"] < 1),
            "max_domain_replay": max(e["domain_max_err"] for e in errs if e["domain_share"] < 1), "fit": fit}
    return out


def _order_groups(runs: list[dict]) -> dict[tuple[int, float], list[dict]]:
    """The WSD runs at the main shares grouped by (steps, domain share), in data-order order (order 0 first)."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["spec"].get("order_seed", 0)):
        s = r["spec"]
        if s["schedule"] == "wsd" and s["domain_share"] in SHARES:
            groups.setdefault((s["steps"], s["domain_share"]), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])))


def _mean_run(group: list[dict], schedule: str, upto: int | None = None) -> dict:
    """The order-averaged run: each eval step's losses averaged over the data orders of one spec."""
    hist = [{"step": rows[0]["step"], "general_loss": float(np.mean([h["general_loss"] for h in rows])),
             "domain_loss": float(np.mean([h["domain_loss"] for h in rows]))}
            for rows in zip(*(r["history"] for r in group)) if upto is None or rows[0]["step"] <= upto]
    return {"spec": dict(group[0]["spec"], schedule=schedule), "lrs": group[0]["lrs"], "history": hist}


def _stable(lab: LabConfig, steps: int, at: list[int]) -> np.ndarray:
    """Eval steps in a WSD run's stable phase (before its linear decay), where it is a constant-LR run."""
    return np.array(at) <= steps - max(1, round(lab.wsd_decay * steps))


def replicate_checks(lab: LabConfig, pt_info: dict, runs: list[dict], reps: list[dict], fit) -> dict:
    """The held-out WSD runs over N data orders: seed-to-seed spread, the law's (fitted on the order-0 constant +
    cosine pilots) max error against each order and against the order-averaged curve, split into the stable and
    the decay phase; and a refit whose constant pilots are the order-averaged WSD-400 stable phases (what averaging
    the pilots' own single-order noise buys)."""
    from hf_cpt.dynamics import fit_dynamics

    groups = _order_groups(runs + reps)
    rows = []
    for (steps, share), group in groups.items():
        pilot = as_pilot(group[0])
        pred = dict(zip(("general", "domain"), fit.predict(pilot.lrs, share, pilot.steps)))
        stable = _stable(lab, steps, list(pilot.steps))
        row: dict = {"run": pilot.name, "steps": steps, "domain_share": share,
                     "orders": [r["spec"].get("order_seed", 0) for r in group]}
        for k in ("general", "domain"):
            c = np.array([[h[f"{k}_loss"] for h in r["history"]] for r in group])
            err = np.abs(pred[k] - c.mean(0))
            n = len(c)
            # what a perfect law would score against the n-order mean: each order minus the mean of the others has
            # the variance of n / (n - 1) runs' noise, the n-order mean 1 / n of it
            floor = float(np.mean([np.abs(c[i] - np.delete(c, i, 0).mean(0)).max() for i in range(n)])
                          * np.sqrt((n - 1) / n ** 2)) if n > 1 else float("nan")
            row[k] = {"spread": float((c.max(0) - c.min(0)).max()),
                      "sd": float(c.std(0, ddof=1).mean()) if len(c) > 1 else 0.0,
                      "err_single": [float(np.abs(pred[k] - x).max()) for x in c], "err_mean": float(err.max()),
                      "err_mean_step": int(pilot.steps[int(err.argmax())]),
                      "err_mean_signed": float((pred[k] - c.mean(0))[int(err.argmax())]),
                      "err_mean_stable": float(err[stable].max()), "err_mean_decay": float(err[~stable].max()),
                      "order0_vs_mean_stable": float(np.abs(c[0] - c.mean(0))[stable].max()), "noise_floor": floor}
        rows.append(row)
    out: dict = {"orders": len(next(iter(groups.values()))), "runs": rows,
                 "replicate_minutes": sum(r["seconds"] for r in reps) / 60}
    replay = [r for r in rows if r["domain_share"] < 1]
    for k in ("general", "domain"):
        for m in ("spread", "sd", "err_mean", "err_mean_stable", "err_mean_decay", "order0_vs_mean_stable",
                  "noise_floor"):
            out[f"max_{k}_{m}"] = max(r[k][m] for r in replay)
        out[f"max_{k}_err_single"] = [max(r[k]["err_single"][i] for r in replay) for i in range(out["orders"])]
    if out["orders"] > 1:
        known = {"pretrain_area": pt_info["forward_area"] / lab.cpt_lr, "lr_before": pt_info["final_lr"],
                 "lr_unit": lab.cpt_lr}
        cut = BUDGETS[-1] - max(1, round(lab.wsd_decay * BUDGETS[-1]))
        pilots = ([as_pilot(_mean_run(g, "constant", cut), cut) for (b, _), g in groups.items() if b == BUDGETS[-1]]
                  + [as_pilot(r) for r in runs if r["spec"]["schedule"] == "cosine"
                     and r["spec"]["domain_share"] in SHARES])
        refit = fit_dynamics(pilots, **known)
        errs = {"general": [], "domain": []}
        for (steps, share), group in groups.items():
            if share < 1:
                mean = as_pilot(_mean_run(group, "wsd"))
                stable = _stable(lab, steps, list(mean.steps))
                for k, pred in zip(("general", "domain"), refit.predict(mean.lrs, share, mean.steps)):
                    err = np.abs(pred - np.array(getattr(mean, k)))
                    errs[k].append((float(err.max()), float(err[~stable].max())))
        out["refit_averaged_constant_pilots"] = {
            "constant_pilots_upto": cut, "rmse_general": refit.rmse_general, "rmse_domain": refit.rmse_domain,
            **{f"max_{k}_err_mean": max(e[0] for e in v) for k, v in errs.items()},
            **{f"max_{k}_err_mean_decay": max(e[1] for e in v) for k, v in errs.items()}}
    return out


def print_replicates(rep: dict) -> None:
    n = rep["orders"]
    print(f"\n## data-order replicates: the 12 held-out WSD runs with {n} CPT data orders (law fitted on the order-0 "
          f"constant + cosine pilots; the {n - 1} extra orders took {rep['replicate_minutes']:.1f} min)")
    print("| WSD run | spread g / d | mean sd g / d | law vs each order: general | law vs each order: domain | law vs "
          "order mean g / d (predicted - measured @ step) | same, stable / decay: general | domain | order 0 vs mean, stable g / d | perfect law vs "
          "mean (noise floor) g / d |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rep["runs"]:
        g, d = r["general"], r["domain"]
        print(f"| {r['run']} | {g['spread']:.4f} / {d['spread']:.4f} | {g['sd']:.4f} / {d['sd']:.4f} | "
              + " ".join(f"{e:.4f}" for e in g["err_single"]) + " | " + " ".join(f"{e:.4f}" for e in d["err_single"])
              + f" | {g['err_mean_signed']:+.4f} @{g['err_mean_step']} / {d['err_mean_signed']:+.4f} "
              f"@{d['err_mean_step']} | {g['err_mean_stable']:.4f} / "
              f"{g['err_mean_decay']:.4f} | {d['err_mean_stable']:.4f} / {d['err_mean_decay']:.4f} | "
              f"{g['order0_vs_mean_stable']:.4f} / {d['order0_vs_mean_stable']:.4f} | {g['noise_floor']:.4f} / "
              f"{d['noise_floor']:.4f} |")
    print("max over replay > 0: spread general {:.4f} domain {:.4f}; law vs each order: general {} domain {}; law vs "
          "the {}-order mean: general {:.4f} (stable {:.4f}, decay {:.4f}) domain {:.4f} (stable {:.4f}, decay "
          "{:.4f}); order 0 vs the mean in the stable phase (= the constant pilots' own noise): general {:.4f} "
          "domain {:.4f}".format(
              rep["max_general_spread"], rep["max_domain_spread"],
              " ".join(f"{e:.4f}" for e in rep["max_general_err_single"]),
              " ".join(f"{e:.4f}" for e in rep["max_domain_err_single"]), n, rep["max_general_err_mean"],
              rep["max_general_err_mean_stable"], rep["max_general_err_mean_decay"], rep["max_domain_err_mean"],
              rep["max_domain_err_mean_stable"], rep["max_domain_err_mean_decay"],
              rep["max_general_order0_vs_mean_stable"], rep["max_domain_order0_vs_mean_stable"]))
    worst = max(rep["max_general_err_mean"], rep["max_domain_err_mean"])
    print(f"goal 0.02 against the {n}-order mean (replay > 0): " + ("met" if worst <= 0.02 else
                                                                     f"missed by {worst - 0.02:.4f} nats")
          + f"; a perfect law would score about {rep['max_general_noise_floor']:.4f} / "
          f"{rep['max_domain_noise_floor']:.4f} (general / domain, the mean's own noise, estimated leave-one-out); "
          "runs where the law's error exceeds that estimate: " + (", ".join(
              f"{r['run']} {k} {r[k]['err_mean']:.4f} > {r[k]['noise_floor']:.4f}" for r in rep["runs"]
              if r["domain_share"] < 1 for k in ("general", "domain") if r[k]["err_mean"] > r[k]["noise_floor"])
              or "none"))
    refit = rep.get("refit_averaged_constant_pilots")
    if refit:
        print(f"refit with the constant pilots averaged over the {n} orders (the WSD-400 stable phases, <= "
              f"{refit['constant_pilots_upto']} steps) + the order-0 cosine pilots: rmse {refit['rmse_general']:.4f} "
              f"/ {refit['rmse_domain']:.4f}; max error vs the mean (replay > 0): general "
              f"{refit['max_general_err_mean']:.4f} (decay {refit['max_general_err_mean_decay']:.4f}), domain {refit['max_domain_err_mean']:.4f} (decay "
              f"{refit['max_domain_err_mean_decay']:.4f}); its stable phase is in-sample, the decay phase is not")


def dynamics_cmr(fit, lab: LabConfig, bound: float) -> float:
    """The CMR at the full budget from the learning-dynamics law: the largest domain share whose predicted general
    loss after a constant-LR run of the full budget stays within `bound` (shares on a 0.005 grid, interpolated
    between the fitted ones)."""
    lrs = lab_lrs(RunSpec("constant", BUDGETS[-1], 1.0, lab.cpt_lr), lab)
    best = None
    for p in np.arange(min(fit.shares), max(fit.shares) + 1e-9, 0.005):
        g, _ = fit.predict(lrs, float(p), [BUDGETS[-1]])
        if g[0] <= bound:
            best = float(p)
    return best if best is not None else 0.0


def measured_cmr(runs: list[dict], step: int, bound: float) -> float:
    """The largest domain share whose general loss at `step` stays within `bound`, interpolated linearly between
    the swept shares (constant-LR runs)."""
    pts = sorted((r["spec"]["domain_share"], next(h["general_loss"] for h in r["history"] if h["step"] == step))
                 for r in runs if r["spec"]["schedule"] == "constant")
    if pts[-1][1] <= bound:
        return 1.0
    for (p0, g0), (p1, g1) in zip(pts, pts[1:]):
        if g0 <= bound < g1:
            return p0 + (bound - g0) * (p1 - p0) / (g1 - g0)
    return 0.0 if pts[0][1] > bound else pts[0][0]


def cmr_checks(lab: LabConfig, runs: list[dict], tolerance: float, dyn_fit) -> dict:
    from hf_cpt.mixers.cmr import CMRRecord, fit_cmr_law, predict_cmr

    tokens = lab.batch * lab.block
    const = [r for r in runs if r["spec"]["schedule"] == "constant"]
    base = const[0]["history"][0]["general_loss"]
    bound = base * (1 + tolerance)
    pilot_max = BUDGETS[-1] // 10
    records = []
    for r in const:
        if r["spec"]["domain_share"] not in SHARES:  # pilots at the 4 main shares; the sweep adds 4 more
            continue
        for h in r["history"]:
            if h["step"] <= pilot_max and h["step"] % 4 == 0:
                records.append(CMRRecord(r["spec"]["domain_share"], float(h["step"] * tokens), h["general_loss"],
                                         h["domain_loss"]))
    fit = fit_cmr_law(records, tolerance)
    pred = predict_cmr(fit, float(BUDGETS[-1] * tokens), bootstrap=100)
    return {"tolerance": tolerance, "bound": bound, "pilot_steps": pilot_max, "records": len(records),
            "dynamics_cmr": dynamics_cmr(dyn_fit, lab, bound),
            "measured_at_pilots": {s: measured_cmr(const, s, bound) for s in (8, 20, 40, 120)},
            "fitted_at_pilots": dict(zip([int(b // tokens) for b in fit.budgets], fit.cmr_at_budgets)),
            "measured_full": measured_cmr(const, BUDGETS[-1], bound), "predicted": pred.cmr,
            "interval": pred.interval, "power_law_cmr": pred.power_law_cmr, "power_law_note": pred.power_law_note,
            "fit": fit, "prediction": pred}


def plan_check(lab: LabConfig, pt_info: dict, runs: list[dict], tolerance: float) -> dict:
    """`plan_from_pilots` on the constant + cosine runs for a 400-step budget (the lab's replay ratios, the three
    schedules), and the measured run that matches the recommendation."""
    from hf_cpt.recipe.plan import plan_from_pilots

    main = [r for r in runs if r["spec"]["domain_share"] in SHARES]
    plan = plan_from_pilots(_pilots_upto(main, None), BUDGETS[-1], tolerance, pretrain_area=pt_info["forward_area"]
                            / lab.cpt_lr, lr_before=pt_info["final_lr"], bootstrap=20,
                            warmup_steps=lab.cpt_warmup, replay_ratios=[1 - p for p in SHARES])
    c = plan.recommended
    out = {"bound": plan.general_bound, "recommended": None if c is None else vars(c), "measured": None}
    print(f"\n## plan for {BUDGETS[-1]} steps, tolerance +{tolerance:.0%} (bound {plan.general_bound:.4f}), from "
          f"the constant + cosine runs")
    if c is None:
        print("no candidate meets the tolerance")
        return out
    print(f"recommended: {c.schedule}, peak LR {c.peak_lr:g}, replay {c.replay_ratio:g}: predicted general "
          f"{c.general_end:.4f} (band top {c.general_hi:.4f}), domain {c.domain_end:.4f}")
    match = [r for r in runs if r["spec"]["schedule"] == c.schedule and r["spec"]["steps"] == BUDGETS[-1]
             and abs(r["spec"]["domain_share"] - (1 - c.replay_ratio)) < 1e-9]
    if match:
        end = match[0]["history"][-1]
        out["measured"] = {"general": end["general_loss"], "domain": end["domain_loss"]}
        print(f"measured that run: general {end['general_loss']:.4f}, domain {end['domain_loss']:.4f} "
              f"({'within' if end['general_loss'] <= plan.general_bound else 'OVER'} the bound)")
    else:
        print("(the lab grid has no run with that setting to compare)")
    return out


def plot_lab(runs: list[dict], dyn: dict, cmr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(iter(dyn))
    fit = dyn[key]["fit"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, r in enumerate(x for x in runs if x["spec"]["schedule"] == "wsd" and x["spec"]["steps"] == BUDGETS[-1]):
        p = as_pilot(r)
        g, d = fit.predict(p.lrs, p.domain_share)
        for ax, measured, pred in ((axes[0], p.general, g), (axes[1], p.domain, d)):
            ax.plot(np.arange(len(pred)), pred, color=f"C{i}", lw=1.2, label=f"predicted, replay {1 - p.domain_share:g}")
            ax.scatter(p.steps, measured, color=f"C{i}", s=9)
    axes[0].set_title(f"general (KJV) held-out loss of the held-out 400-step WSD runs\nlaw fitted on {key}",
                      fontsize=8)
    axes[0].set(xlabel="step", ylabel="loss (nats)")
    axes[1].set_title("domain (Python docs) held-out loss, same runs\nlines: predicted, points: measured", fontsize=8)
    axes[1].set(xlabel="step")
    const = sorted((r["spec"]["domain_share"], r["history"][-1]["general_loss"]) for r in runs
                   if r["spec"]["schedule"] == "constant")
    axes[2].plot([c[0] for c in const], [c[1] for c in const], "o-", label=f"general loss at {BUDGETS[-1]} steps")
    axes[2].axhline(cmr["bound"], color="k", ls="--", lw=1, label=f"tolerance (+{cmr['tolerance']:.0%})")
    axes[2].axvline(cmr["measured_full"], color="C2", label=f"measured CMR {cmr['measured_full']:.3f}")
    lo, hi = cmr["interval"]
    axes[2].axvspan(lo, hi, color="C3", alpha=0.2)
    axes[2].axvline(cmr["predicted"], color="C3", ls=":", label=f"predicted from <= {cmr['pilot_steps']}-step "
                                                               f"pilots {cmr['predicted']:.3f} [{lo:.3f}, {hi:.3f}]")
    axes[2].axvline(cmr["dynamics_cmr"], color="C4", ls="-.", label=f"learning-dynamics law from the same pilots "
                                                                     f"{cmr['dynamics_cmr']:.3f}")
    axes[2].set(title="CMR at the full budget", xlabel="domain share", ylim=(min(c[1] for c in const) - 0.05,
                                                                             cmr["bound"] + 0.3))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(lab: LabConfig, pt_info: dict, runs: list[dict], reps: list[dict], out: Path, wall: float,
            tolerance: float) -> dict:
    t0 = time.perf_counter()
    dyn = dynamics_checks(lab, pt_info, runs)
    rep = replicate_checks(lab, pt_info, runs, reps, dyn["constant+cosine, all lengths | per ratio, S_pt known"]["fit"])
    cmr = cmr_checks(lab, runs, tolerance, dyn["pilots <= 40 steps (10%) | per ratio, S_pt known"]["fit"])
    plan = plan_check(lab, pt_info, runs, tolerance)
    print(f"\npretrained: general {pt_info['history'][-1]['general_loss']:.4f}, domain "
          f"{pt_info['history'][-1]['domain_loss']:.4f} nats after {lab.pt_steps} steps")
    print("\n## learning-dynamics law: max |predicted - measured| over the held-out WSD runs' eval steps (nats)")
    print("| pilots | variant | runs | fit rmse g / d | WSD max err general | WSD max err domain | same, replay > 0 "
          "only (g / d) | goal 0.02 |")
    print("|---|---|---:|---|---:|---:|---|---|")
    for name, r in dyn.items():
        split, variant = name.split(" | ")
        ok = "met" if max(r["max_general"], r["max_domain"]) <= 0.02 else "missed"
        print(f"| {split} | {variant} | {r['pilots']} | {r['rmse_general']:.4f} / {r['rmse_domain']:.4f} | "
              f"{r['max_general']:.4f} | {r['max_domain']:.4f} | {r['max_general_replay']:.4f} / "
              f"{r['max_domain_replay']:.4f} | {ok} |")
    for name, r in dyn.items():
        print(f"\n{name}: momentum {r['momentum']}, at bounds {r['at_bounds']}, fit {r['fit_seconds']:.1f} s")
        for e in r["heldout"]:
            print(f"  {e['run']:<16} general max {e['general_max_err']:.4f} rmse {e['general_rmse']:.4f} end "
                  f"{e['general_end_err']:+.4f} | domain max {e['domain_max_err']:.4f} rmse {e['domain_rmse']:.4f} "
                  f"end {e['domain_end_err']:+.4f}")
    print(f"\n## CMR (tolerance +{tolerance:.0%} relative, general bound {cmr['bound']:.4f})")
    print(f"pilots: constant runs at domain shares {SHARES}, evaluations at <= {cmr['pilot_steps']} steps "
          f"({cmr['records']} records)")
    print("measured CMR at pilot budgets: " + ", ".join(f"{k}: {v:.3f}" for k, v in cmr["measured_at_pilots"].items()))
    print("fitted CMR at pilot budgets:   " + ", ".join(f"{k}: {v:.3f}" for k, v in cmr["fitted_at_pilots"].items()))
    err = cmr["predicted"] - cmr["measured_full"]
    print(f"CMR at {BUDGETS[-1]} steps: predicted {cmr['predicted']:.3f} (90% interval {cmr['interval'][0]:.3f}-"
          f"{cmr['interval'][1]:.3f}), measured {cmr['measured_full']:.3f}: error {err:+.3f} "
          f"({'met' if abs(err) <= 0.05 else 'missed'}, goal +-0.05)")
    derr = cmr["dynamics_cmr"] - cmr["measured_full"]
    print(f"CMR at {BUDGETS[-1]} steps from the learning-dynamics law (fitted on the <= {cmr['pilot_steps']}-step "
          f"constant + cosine pilots): {cmr['dynamics_cmr']:.3f}: error {derr:+.3f} "
          f"({'met' if abs(derr) <= 0.05 else 'missed'}, goal +-0.05)")
    power = cmr["power_law_cmr"]
    print("paper's power law: " + (f"{power:.3f}" if power is not None else f"not reported: {cmr['power_law_note']}"))
    print_replicates(rep)
    summary = {"lab": asdict(lab), "grid_minutes": wall / 60, "analysis_seconds": time.perf_counter() - t0,
               "pretrain": {k: v for k, v in pt_info.items()},
               "dynamics": {k: {kk: vv for kk, vv in v.items() if kk != "fit"} | {"laws": v["fit"].to_dict()["laws"]}
                            for k, v in dyn.items()},
               "cmr": {k: v for k, v in cmr.items() if k not in ("fit", "prediction")}, "plan": plan,
               "replicates": rep,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    plot_lab(runs, dyn, cmr, out / "cpt_lab.png")
    print(f"\nwrote {out / 'cpt_lab.png'} and {out / 'results.json'} (analysis {summary['analysis_seconds']:.0f} s)")
    return summary


# --- SmolLM2 (shorter grid, through the recipe) ------------------------------------------------------------------
SMOL_GRID = [("constant", 24, 0.5), ("cosine", 24, 0.5), ("constant", 24, 0.25), ("cosine", 24, 0.25),
             ("wsd", 48, 0.5)]  # (schedule, steps, replay ratio); the 48-step WSD run is held out


def smol_config(schedule: str, steps: int, replay: float):
    """The quickstart template (embedded SmolLM2-135M, Python docs) replaying self-synthesised general text,
    held-out sets `general_self` (what the base model writes) and `domain`."""
    from hf_cpt.callbacks.rewarm import RewarmConfig
    from hf_cpt.config import CPTConfig

    warm = 4
    sched = {"constant": RewarmConfig(schedule="constant", warmup_steps=warm),
             "cosine": RewarmConfig(schedule="rewarm", warmup_steps=warm, decay="cosine", min_lr_ratio=0.1),
             "wsd": RewarmConfig(schedule="wsd", warmup_steps=warm, decay="linear", min_lr_ratio=0.1,
                                 decay_steps=max(1, round(0.2 * steps)))}[schedule]
    cfg = CPTConfig.from_yaml(Path(__file__).with_name("quickstart_round2.yaml"))  # the recipe measured
    return cfg.override({"data.general.train": "self", "data.synth.train_tokens": 12_000, "data.replay_ratio": replay,
                         "monitor.general": "general_self", "monitor.kl": False, "monitor.action": "none",
                         "monitor.guards": [{"set": "general_self", "metric": "loss"}],  # no KL measured
                         "downstream": None, "train.max_steps": steps, "train.eval_steps": 2, "schedule": sched,
                         "train.logging_steps": 2})  # 12 evaluations per pilot: the law needs >= 16 per ratio


def run_smol(cache: Path, out: Path) -> None:
    """Pilots (constant + cosine, 24 steps, replay 0.25 and 0.5) and a held-out 48-step WSD run on SmolLM2 via
    `run_cpt`; `plan_cpt` reads their output directories (metrics.json), as `hf-cpt plan` does."""
    from hf_cpt.recipe.plan import plan_cpt, read_pilot
    from hf_cpt.recipe.train import run_cpt

    dirs = []
    t0 = time.perf_counter()
    for schedule, steps, replay in SMOL_GRID:
        cfg = smol_config(schedule, steps, replay)
        d = cache / "smollm2" / f"{schedule}-{steps}-r{replay:g}-{_key([LAB_VERSION, cfg.to_dict()])}"
        if not (d / "metrics.json").exists():
            run_cpt(cfg, output_dir=d, overwrite=True)
        dirs.append(d)
        print(f"{d.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    plan = plan_cpt(dirs[:-1], budget_steps=48, tolerance=0.05, bootstrap=20)
    held, _ = read_pilot(dirs[-1])
    g, d = plan.fit.predict(held.lrs, held.domain_share, held.steps)
    eg, ed = np.abs(g - np.array(held.general)).max(), np.abs(d - np.array(held.domain)).max()
    print(f"SmolLM2: fit on {len(dirs) - 1} pilots (rmse general_self {plan.fit.rmse_general:.4f}, domain "
          f"{plan.fit.rmse_domain:.4f}); held-out WSD 48 steps: max |error| general_self {eg:.4f}, domain {ed:.4f} "
          f"nats ({'met' if max(eg, ed) <= 0.02 else 'missed'}, goal 0.02); grid {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"held-out WSD end (step {held.steps[-1]}): general_self predicted {g[-1]:.4f} measured "
          f"{held.general[-1]:.4f}, domain predicted {d[-1]:.4f} measured {held.domain[-1]:.4f}; law momentum "
          f"{[law.momentum for law in plan.fit.laws]}, at bounds {plan.fit.at_bounds}")
    c = plan.recommended
    print(f"plan for 48 steps, tolerance +5% (bound {plan.general_bound:.4f}): " + (
        "no candidate meets the tolerance" if c is None else
        f"{c.schedule}, peak LR {c.peak_lr:g}, replay {c.replay_ratio:g}: predicted general_self {c.general_end:.4f} "
        f"(band top {c.general_hi:.4f}), domain {c.domain_end:.4f}"))
    out.mkdir(parents=True, exist_ok=True)
    heldout = {"steps": held.steps, "general_self": held.general, "domain": held.domain,
               "predicted_general_self": g.tolist(), "predicted_domain": d.tolist()}
    (out / "smollm2.json").write_text(json.dumps({"max_err_general_self": eg, "max_err_domain": ed, "heldout": heldout,
                                                  "plan": plan.to_dict()}, indent=1, default=float))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("HF_CPT_LAB_CACHE",
                                                                     "~/.cache/hf-cpt/cpt_lab")).expanduser())
    p.add_argument("--out", type=Path, default=Path("docs/cpt_lab"))
    p.add_argument("--runs-only", action="store_true", help="run (or load) the grid, skip the analysis")
    p.add_argument("--smollm2", action="store_true", help="the shorter grid on the embedded SmolLM2 (run_cpt)")
    p.add_argument("--tolerance", type=float, default=0.05, help="CMR: allowed relative rise of the general loss")
    p.add_argument("--replicates", type=int, default=3, help="CPT data orders of the held-out WSD runs (1: only "
                   "the lab's order; N: N - 1 more orders, ~6 min each on 2 CPUs)")
    p.add_argument("--packing", choices=("documents", "concat"), default="documents",
                   help="block layout (hf_cpt's `data.packing`); `concat` reproduces the lab before issue 29")
    a = p.parse_args()
    if a.replicates < 1:
        p.error(f"`--replicates` must be >= 1, got {a.replicates}")
    if a.smollm2:
        run_smol(a.cache, a.out)
        return
    lab = LabConfig(packing=a.packing)
    t0 = time.perf_counter()
    pt_info, runs, reps = run_lab(lab, a.cache, a.replicates)
    wall = time.perf_counter() - t0
    print(f"lab grid: {len(runs)} runs + {len(reps)} data-order replicates in {wall / 60:.1f} min (pretraining "
          f"{pt_info['seconds'] / 60:.1f} min "
          f"when not cached); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    if a.runs_only:
        return
    analyse(lab, pt_info, runs, reps, a.out, wall, a.tolerance)


if __name__ == "__main__":
    main()
