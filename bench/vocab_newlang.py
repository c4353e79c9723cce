"""Vocabulary extension for a *new language* (OFA's intended case): SmolLM2-135M (English-centric) + German.

Needs Debian packages (not CI material): `apt-get install debian-reference-de debian-reference-en
dict-freedict-eng-deu`. German text: the German Debian Reference (90 % to learn tokens, 10 % held out); English
text: the English Debian Reference and the embedded KJV. Learns `--n-new` German subwords, then initialises their
rows with each initialiser and reports the step-0 held-out loss on German and on English (KJV), with the same
extended tokenizer for every init; `distill` (Token Distillation) takes its contexts from the German training text.
OFA runs twice: word vectors built from the corpora alone, and the same vectors
with German words placed at their English translations' mean via FreeDict eng-deu (`vectors_from_dictionary`).

    python bench/vocab_newlang.py [--n-new 5000]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_cpt.recipe.models import resolve_model_path  # noqa: E402
from hf_cpt.testing import read_embedded  # noqa: E402
from hf_cpt.vocab.extend import extend_model  # noqa: E402
from hf_cpt.vocab.tokens import learn_domain_tokens  # noqa: E402
from hf_cpt.vocab.vectors import build_word_vectors, read_freedict, vectors_from_dictionary  # noqa: E402

REF = Path("/usr/share/debian-reference")
DICT = Path("/usr/share/dictd/freedict-eng-deu.index")


def paragraphs(path: Path) -> list[str]:
    text = gzip.open(path, "rt", encoding="utf-8").read()
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.strip()) > 80 and "+---" not in p]


def blocks(texts: list[str], tok, n: int = 16, size: int = 128) -> torch.Tensor:
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    return torch.tensor([ids[k * size:(k + 1) * size] for k in range(n)])


@torch.no_grad()
def loss(model, x: torch.Tensor) -> float:
    return sum(model(x[i:i + 8], labels=x[i:i + 8]).loss.item() for i in range(0, len(x), 8)) / (len(x) // 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-new", type=int, default=5000)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--inits", default="distill,ofa,subword_mean,mean,random")
    ap.add_argument("--distill-layer", type=int, default=-1, help="`vocab.distill_layer` (-1: final hidden states)")
    ap.add_argument("--distill-context-length", type=int, default=32, help="`vocab.distill_context_length`")
    ap.add_argument("--distill-contexts", type=int, default=2, help="`vocab.distill_contexts` per new token")
    ap.add_argument("--distill-precision", default="auto",
                    help="`vocab.distill_precision` (auto|float32|bfloat16); a comma list runs distill once per value "
                         "and prints the time ratio to the first")
    args = ap.parse_args()
    distill_opts = {"distill_layer": args.distill_layer, "distill_context_length": args.distill_context_length,
                    "distill_contexts": args.distill_contexts}
    precisions = args.distill_precision.split(",")
    inits = args.inits.split(",")
    missing = [p for p in (REF / "debian-reference.de.txt.gz", REF / "debian-reference.en.txt.gz", DICT)
               if not p.exists()]
    if missing:
        sys.exit(f"missing {missing}: apt-get install debian-reference-de debian-reference-en dict-freedict-eng-deu")
    de = paragraphs(REF / "debian-reference.de.txt.gz")
    cut = int(len(de) * 0.9)
    de_train, de_eval = de[:cut], de[cut:]
    en = paragraphs(REF / "debian-reference.en.txt.gz") + read_embedded("kjv")
    path = resolve_model_path("embedded:smollm2-135m")
    base = AutoTokenizer.from_pretrained(path)
    t = time.perf_counter()
    ext = learn_domain_tokens(de_train, base, args.n_new, heldout=de_eval, general=read_embedded("kjv", "validation"),
                              min_frequency=args.min_frequency)
    learn_s = time.perf_counter() - t
    t = time.perf_counter()
    corpus_vectors = build_word_vectors(de_train + en, dim=100)
    vec_s = time.perf_counter() - t
    t = time.perf_counter()
    pairs = read_freedict(DICT)
    dict_vectors = vectors_from_dictionary(corpus_vectors, pairs)
    dict_s = time.perf_counter() - t
    evals = {"german": blocks(de_eval, ext.tokenizer), "english (KJV)": blocks(read_embedded("kjv", "validation"),
                                                                              ext.tokenizer)}
    base_evals = {"german": blocks(de_eval, base), "english (KJV)": blocks(read_embedded("kjv", "validation"), base)}
    print(f"+{len(ext.new_tokens)} tokens in {learn_s:.1f} s; German held-out fertility {ext.fertility_before:.3f} -> "
          f"{ext.fertility_after:.3f} tokens/word ({ext.stats['used']} used, {ext.stats['intermediates']} "
          f"intermediates; English {ext.stats['general_fertility_before']:.3f} -> "
          f"{ext.stats['general_fertility_after']:.3f}); corpus vectors {len(corpus_vectors.words)} words in {vec_s:.1f} s; "
          f"+ FreeDict: {len(pairs)} pairs, {len(dict_vectors.words)} words in {dict_s:.1f} s\n")
    # (row name, init, extend_model options)
    runs = [(f"distill ({p})" if len(precisions) > 1 else "distill", "distill",
             {**distill_opts, "distill_precision": p}) for p in precisions]
    runs += [("ofa (corpus vectors)", "ofa", {"word_vectors": corpus_vectors}),
             ("ofa (corpus + FreeDict)", "ofa", {"word_vectors": dict_vectors}),
             ("subword_mean", "subword_mean", {}), ("mean", "mean", {}), ("random", "random", {})]
    print(f"distill options: {distill_opts}; torch threads {torch.get_num_threads()}")
    print("| init | extend+init s | OFA coverage | German loss step 0 | English (KJV) loss step 0 |")
    print("|---|---:|---:|---:|---:|")
    distill_seconds = []
    for name, init, opts in [r for r in runs if r[1] in inits]:
        model = AutoModelForCausalLM.from_pretrained(path)
        s = extend_model(model, ext.tokenizer, ext.new_tokens, init, old_tokenizer=base, texts=de_train, **opts)
        cov = f"{s['ofa_coverage']:.0%}" if s["ofa_coverage"] is not None else ""
        if init == "distill":
            distill_seconds.append(s["seconds"])
            print(f"distill: {s.get('distill_contexts', 0):.0f} snippets, bfloat16 autocast "
                  f"{bool(s.get('distill_bfloat16'))}, mean mismatch first pass "
                  f"{s.get('distill_mse_first_pass', 0):.4f}")
        print(f"| {name} | {s['seconds']:.1f} | {cov} | {loss(model, evals['german']):.4f} | "
              f"{loss(model, evals['english (KJV)']):.4f} |", flush=True)
    if len(distill_seconds) > 1:
        print(f"distill time ratio {precisions[0]} / {precisions[1]}: "
              f"{distill_seconds[0] / distill_seconds[1]:.2f}x ({distill_seconds[0]:.1f} s vs "
              f"{distill_seconds[1]:.1f} s)")
    model = AutoModelForCausalLM.from_pretrained(path)
    print(f"| (base tokenizer, no extension) | | | {loss(model, base_evals['german']):.4f} | "
          f"{loss(model, base_evals['english (KJV)']):.4f} |")


if __name__ == "__main__":
    main()
