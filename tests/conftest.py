"""Shared fixtures: a tiny tokenizer and a tiny Llama built from config, saved like a real checkpoint."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1] / "hf_cpt" / "data"


def read_embedded(name: str, split: str = "train", limit: int | None = None) -> list[str]:
    with gzip.open(DATA / name / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    return texts[:limit] if limit else texts


def make_tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = read_embedded("python-docs", limit=20) + read_embedded("kjv", limit=20)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny causal LM checkpoint on disk (safetensors + tokenizer), loadable with `from_pretrained`."""
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def tiny_run_dict(model_dir: Path, **train) -> dict:
    """A complete run config for the tiny model on the embedded corpora, CPU-quick."""
    t = dict(max_steps=4, learning_rate=1e-3, per_device_train_batch_size=2, per_device_eval_batch_size=4,
             eval_steps=2, logging_steps=1, warmup_steps=0, lr_scheduler_type="constant")
    t.update(train)
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"block_size": 32, "max_eval_blocks": 4, "replay_ratio": 0.25},
        "train": t,
        "monitor": {"tolerance": 0.5},
    }
