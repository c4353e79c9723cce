"""Document-aware packing: blocks whose documents neither attend to nor predict each other.

The proof is logits: every document of a packed block gets the logits it gets when run alone (fp32, <= 1e-4),
with sdpa and eager attention, with and without gradient checkpointing, and a real Trainer step's loss is the
token-weighted mean of the per-document losses computed alone.
"""

import copy
import itertools

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.losses import apply_chunked_loss
from hf_cpt.mixers.packing import (
    DocumentMaskingGuard,
    bos_for,
    check_document_masking,
    make_block,
    pack_documents,
    probe_document_masking,
    segment_labels,
    segment_position_ids,
)
from hf_cpt.mixers.replay import ReplayMixer
from hf_cpt.testing import make_tiny_llama, read_embedded

# documents of clearly different lengths: several whole documents per 160-token block
TEXTS = ["In the beginning God created the heaven and the earth.",
         "The list type is a mutable sequence; use append() to add an item at the end of it.",
         "And God said, Let there be light: and there was light.",
         "A dict maps hashable keys to values. Keys are compared by equality, and iteration follows insertion order, "
         "which has been guaranteed since Python 3.7.",
         "Jesus wept.",
         "Exceptions are raised with raise and caught with try/except; finally always runs."] * 4


# --- pure cores ----------------------------------------------------------------------------------------------------
def test_positions_restart_at_every_segment_and_first_targets_are_masked():
    assert segment_position_ids(7, [0, 3, 4]).tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert segment_position_ids(3, []).tolist() == [0, 1, 2]  # position 0 always starts a segment
    assert segment_labels([9, 8, 7, 6, 5], [0, 2]).tolist() == [9, 8, -100, 6, 5]
    concat = make_block([4, 5, 6], [0, 1], "concat")
    assert concat == {"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1], "labels": [4, 5, 6]}
    docs = make_block([4, 5, 6], [0, 1], "documents")
    assert docs == {"input_ids": [4, 5, 6], "position_ids": [0, 0, 1], "labels": [4, -100, 6]}


def test_pack_documents_adds_bos_ends_with_eos_and_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 50, size=n).tolist() for n in (3, 17, 1, 9, 30, 2, 11)]
    blocks = pack_documents(docs, 8, bos_id=1, eos_id=0)
    stream, pos, lab = [], [], []
    for d in docs:  # naive: walk the stream and count positions by hand
        seg = [1] + d + [0]
        stream += seg
        pos += list(range(len(seg)))
        lab += [-100] + seg[1:]
    n = len(stream) // 8 * 8
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 8] for i in range(0, n, 8)]
    for i, b in enumerate(blocks):
        # a block that starts inside a document restarts its positions at 0 (its first token is no target anyway)
        want_pos = pos[i * 8:(i + 1) * 8]
        first = next((j for j, p in enumerate(want_pos) if p == 0), 8)
        want_pos = list(range(first)) + want_pos[first:]
        assert b["position_ids"] == want_pos
        assert b["labels"][1:] == lab[i * 8 + 1:(i + 1) * 8]


class _BosTokenizer:
    """A tokenizer that (like Llama's) puts BOS in front of every text, or not."""

    def __init__(self, adds: bool, bos: int | None = 7):
        self.adds, self.bos_token_id = adds, bos

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if self.adds and add_special_tokens else []) + [42]}


def test_bos_follows_the_tokenizer_unless_told(tiny_tokenizer):
    assert bos_for(tiny_tokenizer) is None  # declares no BOS
    assert bos_for(_BosTokenizer(adds=True)) == 7  # Llama-like: BOS at every document start
    assert bos_for(_BosTokenizer(adds=False)) is None  # declared but never used (SmolLM2's <|im_start|>)
    assert bos_for(_BosTokenizer(adds=False), "always") == 7
    assert bos_for(_BosTokenizer(adds=True), "never") is None
    with pytest.raises(ValueError, match="`add_bos`"):
        bos_for(tiny_tokenizer, "sometimes")


# --- the mixer's blocks --------------------------------------------------------------------------------------------
def _segments(block):
    pos = list(block["position_ids"])
    starts = [i for i, p in enumerate(pos) if p == 0]
    return list(zip(starts, starts[1:] + [len(pos)]))


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_mixer_segments_are_documents_or_their_pieces(tiny_tokenizer, granularity):
    docs = {"domain": TEXTS[::2], "general": TEXTS[1::2]}
    mixer = ReplayMixer(docs, tiny_tokenizer, ratios={"domain": 0.6, "general": 0.4}, block_size=40,
                        granularity=granularity, shuffle=False, emit_sources=True)
    encoded = {n: [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [0] for t in ts]
               for n, ts in docs.items()}
    whole = {n: {tuple(d) for d in ds} for n, ds in encoded.items()}
    for block in itertools.islice(iter(mixer), 30):
        assert "attention_mask" not in block
        for a, b in _segments(block):
            seg = block["input_ids"][a:b]
            src = mixer.names[block["source_ids"][a]]
            assert len(set(block["source_ids"][a:b])) == 1  # a segment never mixes sources
            if seg[-1] == 0 and a > 0:  # a whole document inside the block
                assert tuple(seg) in whole[src] or any(tuple(d[-len(seg):]) == tuple(seg) for d in encoded[src])
            assert a == 0 or block["labels"][a] == -100
            assert block["labels"][a + 1:b] == seg[1:]


def test_concat_keeps_the_old_blocks_bit_for_bit(tiny_tokenizer):
    """`concat` is the layout of the previous release: the stream of documents + EOS, an all-ones mask."""
    mixer = ReplayMixer({"domain": TEXTS}, tiny_tokenizer, ratios={"domain": 1.0}, block_size=32, shuffle=False,
                        packing="concat")
    stream = [t for text in TEXTS for t in tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [0]]
    for i, block in enumerate(itertools.islice(iter(mixer), 5)):
        assert block == {"input_ids": stream[32 * i:32 * (i + 1)], "attention_mask": [1] * 32,
                         "labels": stream[32 * i:32 * (i + 1)]}


def test_token_shares_are_the_same_under_both_packings(tiny_tokenizer):
    docs = {"domain": TEXTS, "general": TEXTS[::-1]}
    counts = {}
    for packing in ("documents", "concat"):
        mixer = ReplayMixer(docs, tiny_tokenizer, ratios={"domain": 0.7, "general": 0.3}, block_size=32,
                            granularity="token", packing=packing)
        list(itertools.islice(iter(mixer), 50))
        counts[packing] = mixer.tokens_per_source
    assert counts["documents"] == counts["concat"] == {"domain": 1120, "general": 480}


# --- logits: every document as if alone ---------------------------------------------------------------------------
def _packed_blocks(tokenizer, block_size=256, n=3):
    mixer = ReplayMixer({"domain": TEXTS}, tokenizer, ratios={"domain": 1.0}, block_size=block_size, shuffle=False)
    return list(itertools.islice(iter(mixer), n))


def _max_doc_diff(model, blocks, min_docs=3):
    ids = torch.tensor([b["input_ids"] for b in blocks])
    pos = torch.tensor([b["position_ids"] for b in blocks])
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    worst, whole = 0.0, 0
    for row, block in enumerate(blocks):
        segments = _segments(block)
        whole += sum(1 for a, b in segments if a > 0 and b < len(block["input_ids"]))
        for a, b in segments:
            alone = model(input_ids=ids[row:row + 1, a:b]).logits
            worst = max(worst, float((packed[row, a:b] - alone[0]).abs().max().detach()))
    assert whole >= min_docs * len(blocks)  # the blocks really hold several whole documents
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_document_gets_its_logits_alone_on_the_tiny_llama(tiny_tokenizer, attn, checkpointing):
    model = make_tiny_llama(len(tiny_tokenizer))
    model.config._attn_implementation = attn
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # checkpointing acts in training mode (the tiny Llama has no dropout)
    blocks = _packed_blocks(tiny_tokenizer)
    with torch.set_grad_enabled(checkpointing):
        assert _max_doc_diff(model, blocks) <= 1e-4


def test_without_restarting_positions_documents_would_leak(tiny_tokenizer):
    """The check above can fail: the same blocks as one causal sequence (or with a KV cache) differ by far more."""
    model = make_tiny_llama(len(tiny_tokenizer))
    block = _packed_blocks(tiny_tokenizer, n=1)[0]
    ids = torch.tensor([block["input_ids"]])
    a, b = _segments(block)[2]
    alone = model(input_ids=ids[:, a:b]).logits[0]
    leaky = model(input_ids=ids).logits[0, a:b]
    cached = model(input_ids=ids, position_ids=torch.tensor([block["position_ids"]]), use_cache=True).logits[0, a:b]
    assert float((leaky - alone).abs().max()) > 1e-2
    assert float((cached - alone).abs().max()) > 1e-2  # why the guard passes use_cache=False


@pytest.mark.slow
# each attention implementation once and checkpointing on and off once (the four pairs took 2.5 min for what two
# show: the masks reach SDPA and eager alike, and recomputation under checkpointing sees the same mask)
@pytest.mark.parametrize(("attn", "checkpointing"), [("sdpa", True), ("eager", False)])
def test_each_document_gets_its_logits_alone_on_smollm2(attn, checkpointing):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_cpt import resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    texts = read_embedded("python-docs", limit=40)
    docs = [t[:n] for t, n in zip(texts[:12], itertools.cycle((120, 300, 60, 200)))]
    mixer = ReplayMixer({"domain": docs}, tok, ratios={"domain": 1.0}, block_size=256, shuffle=False)
    blocks = list(itertools.islice(iter(mixer), 2))
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # SmolLM2 has no dropout: training mode changes nothing but the checkpointing
    with torch.set_grad_enabled(checkpointing):
        # float32 rounding alone moves SmolLM2's logits by ~1e-4 between a packed and a lone forward, by CPU and
        # thread count (<= 1e-4 on an AMD EPYC with 2 threads, 1.3e-4 on an Intel Xeon): bounded here, and the
        # same comparison in float64 must hold to 1e-4 with room to spare (a leak across documents moves logits
        # by 1e-2 and more), so the masking is checked exactly, not up to float32 noise
        assert _max_doc_diff(model, blocks) <= 5e-4
        assert _max_doc_diff(model.double(), blocks) <= 1e-4
    model.float()
    # the probe passes under its own bound (1e-3); its 24-token documents sit near 1e-4 in float32
    assert probe_document_masking(model) <= 5e-4


# --- through a real Trainer step ------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["hf", "chunked", "lora"])
def test_trainer_step_loss_is_the_mean_of_per_document_losses(tiny_tokenizer, tmp_path, loss):
    model = make_tiny_llama(len(tiny_tokenizer))
    assert model.config.use_cache  # the default that would silently turn packed masking off
    reference = copy.deepcopy(model).eval()
    if loss == "chunked":
        apply_chunked_loss(model)
    if loss == "lora":  # a PEFT model: the guard sits on the wrapper, the checks read its base model
        pytest.importorskip("peft")
        from hf_cpt.adapters import add_lora_for_cpt

        model = add_lora_for_cpt(model, r=4, alpha=8, embeddings="none")
    mixer = ReplayMixer({"domain": TEXTS}, tiny_tokenizer, ratios={"domain": 1.0}, block_size=160, shuffle=False)
    batch = list(itertools.islice(iter(ReplayMixer({"domain": TEXTS}, tiny_tokenizer, ratios={"domain": 1.0},
                                                   block_size=160, shuffle=False)), 2))
    total, count = 0.0, 0
    with torch.no_grad():
        for block in batch:
            for a, b in _segments(block):
                seg = torch.tensor([block["input_ids"][a:b]])
                if b - a > 1:
                    total += float(reference(input_ids=seg, labels=seg).loss) * (b - a - 1)
                    count += b - a - 1
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=mixer, data_collator=default_data_collator,
                      callbacks=[ReplayMixerCallback(mixer)])
    trainer.train()
    logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert logged == pytest.approx(total / count, abs=1e-4)
    assert hasattr(model, DocumentMaskingGuard.ATTRIBUTE)  # kept: a later trainer.evaluate() stays per document


# --- the guard ---------------------------------------------------------------------------------------------------------
def test_guard_drops_all_ones_masks_refuses_padding_and_lost_positions(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    guard = DocumentMaskingGuard.attach(model)
    assert DocumentMaskingGuard.attach(model) is guard  # idempotent
    block = _packed_blocks(tiny_tokenizer, n=1)[0]
    ids, pos = torch.tensor([block["input_ids"]]), torch.tensor([block["position_ids"]])
    labels = torch.tensor([block["labels"]])
    clean = model(input_ids=ids, position_ids=pos, labels=labels).loss
    masked = model(input_ids=ids, position_ids=pos, labels=labels, attention_mask=torch.ones_like(ids)).loss
    assert float(masked) == float(clean) and guard.dropped_masks == 1
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    with pytest.raises(ValueError, match="padding `attention_mask`"):
        model(input_ids=ids, position_ids=pos, labels=labels, attention_mask=padded)
    with pytest.raises(ValueError, match="without `position_ids`"):
        model(input_ids=ids, labels=labels)
    model(input_ids=ids)  # no labels: generation or a caller's own forward, left alone
    DocumentMaskingGuard.detach(model)
    assert not hasattr(model, DocumentMaskingGuard.ATTRIBUTE)
    model(input_ids=ids, labels=labels)  # gone


def test_models_that_cannot_keep_documents_apart_are_refused(tiny_tokenizer):
    class NoPositions(torch.nn.Module):
        config = None

        def forward(self, input_ids, attention_mask=None, labels=None):
            return input_ids

    with pytest.raises(ValueError, match="takes no `position_ids`.*data.packing: concat"):
        check_document_masking(NoPositions())
    model = make_tiny_llama(len(tiny_tokenizer))
    model.config._attn_implementation = "my_custom_kernel"
    with pytest.raises(ValueError, match="attention implementation 'my_custom_kernel'"):
        check_document_masking(model)
    leaky = make_tiny_llama(len(tiny_tokenizer))
    leaky.forward = lambda input_ids=None, position_ids=None, **kw: type(leaky).forward(leaky, input_ids=input_ids,
                                                                                         **kw)
    with pytest.raises(ValueError, match="does not keep packed documents apart"):
        probe_document_masking(leaky)
