"""The streaming merge core: interpolation against a naive reference, exact ends, the safetensors writer, sharded
and tied checkpoints, extended vocabularies, and LoRA adapters against peft's own `merge_and_unload`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_cpt.merge import CheckpointReader, interpolate_tensor, merge_checkpoints, write_safetensors
from hf_cpt.merge_lora import lora_scale, merge_lora_checkpoint
from hf_cpt.testing import make_tiny_llama


def _weights(directory) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(directory)
    return {k: reader.get(k) for k in reader.keys()}


def _perturbed(model, seed: int = 1, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 3), (5,), (), (3, 4, 5)])
def test_interpolate_matches_reference_and_is_exact_at_the_ends(dtype, shape):
    g = torch.Generator().manual_seed(0)
    base, adapted = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    for alpha in (0.3, 0.5, 0.7, 1.5, -0.25):
        want = (base.double() + alpha * (adapted.double() - base.double())).to(dtype)
        torch.testing.assert_close(interpolate_tensor(base, adapted, alpha), want, atol=1e-2, rtol=1e-2)
    assert torch.equal(interpolate_tensor(base, adapted, 0.0), base)
    assert torch.equal(interpolate_tensor(base, adapted, 1.0), adapted)
    assert torch.equal(interpolate_tensor(base, adapted, 0), base)


def test_extra_and_new_rows_come_from_the_adapted_tensor():
    base, adapted = torch.randn(5, 3), torch.randn(8, 3)
    out = interpolate_tensor(base, adapted, 0.5)
    torch.testing.assert_close(out[:5], (base + adapted[:5]) / 2)
    assert torch.equal(out[5:], adapted[5:])
    assert torch.equal(interpolate_tensor(base, adapted, 0.0)[:5], base)
    same = torch.randn(8, 3)
    out = interpolate_tensor(same, adapted, 0.0, new_rows_from=6)
    assert torch.equal(out[:6], same[:6]) and torch.equal(out[6:], adapted[6:])
    with pytest.raises(ValueError, match="only extra rows"):
        interpolate_tensor(torch.randn(5, 3), torch.randn(5, 4), 0.5, name="w")
    with pytest.raises(ValueError, match="`alpha`"):
        interpolate_tensor(base, adapted, float("nan"))


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.tensor([True, False]),
               "f": torch.zeros(0, 4)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    calls = []
    write_safetensors(tmp_path / "x.safetensors", specs, lambda k: calls.append(k) or tensors[k], {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors) and sorted(calls) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def _pair(tmp_path, *, shard: str | None = None, extend: int = 0, untie: bool = False):
    base = make_tiny_llama(64, seed=0)
    adapted = _perturbed(make_tiny_llama(64, seed=0))
    if untie:
        for m in (base, adapted):
            m.config.tie_word_embeddings = False
            m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight.detach().clone() + 0.01)
    if extend:
        adapted.resize_token_embeddings(64 + extend)
    kw = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(tmp_path / "base", **kw)
    adapted.save_pretrained(tmp_path / "adapted", **kw)
    (tmp_path / "out").mkdir()
    return tmp_path / "base", tmp_path / "adapted", tmp_path / "out"


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_merge_is_the_base_at_0_the_adapted_at_1_and_linear_between(tmp_path, shard):
    base_dir, adapted_dir, _ = _pair(tmp_path, shard=shard)
    base, adapted = _weights(base_dir), _weights(adapted_dir)
    for alpha in (0.0, 1.0, 0.4):
        out = tmp_path / f"out-{alpha}"
        out.mkdir()
        summary = merge_checkpoints(base_dir, adapted_dir, out, alpha)
        merged = _weights(out)
        assert set(merged) == set(adapted) and summary.tensors == len(adapted)
        for k in merged:
            if alpha == 0.0:
                assert torch.equal(merged[k], base[k]), k
            elif alpha == 1.0:
                assert torch.equal(merged[k], adapted[k]), k
            else:
                torch.testing.assert_close(merged[k], base[k] + alpha * (adapted[k] - base[k]))
    if shard:
        index = json.loads((tmp_path / "out-0.4" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert sorted(summary.files) == sorted(set(index["weight_map"].values()))
    else:
        assert summary.files == ["model.safetensors"]


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, adapted_dir, out = _pair(tmp_path, shard="20KB")
    merge_checkpoints(base_dir, adapted_dir, out, 1.0)
    (out / "config.json").write_text((adapted_dir / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want = AutoModelForCausalLM.from_pretrained(adapted_dir)
    for (k, a), (_, b) in zip(loaded.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("untie", [False, True])
def test_extended_vocabulary_rows_come_from_the_adapted_model(tmp_path, untie):
    base_dir, adapted_dir, out = _pair(tmp_path, extend=8, untie=untie)
    summary = merge_checkpoints(base_dir, adapted_dir, out, 0.0)
    merged, base, adapted = _weights(out), _weights(base_dir), _weights(adapted_dir)
    keys = ["model.embed_tokens.weight"] + (["lm_head.weight"] if untie else [])
    assert sorted(summary.extended_rows) == sorted(keys)
    for k in keys:
        assert merged[k].shape[0] == 72
        assert torch.equal(merged[k][:64], base[k]) and torch.equal(merged[k][64:], adapted[k][64:])
    out2 = tmp_path / "out2"
    out2.mkdir()
    merge_checkpoints(base_dir, adapted_dir, out2, 0.0, new_rows_from=60)  # new tokens in the base's last rows
    assert torch.equal(_weights(out2)[keys[0]][60:], adapted[keys[0]][60:])


def test_a_head_tied_on_one_side_is_read_from_its_embedding(tmp_path):
    (tmp_path / "b").mkdir()  # a base that stores its tied head explicitly (some Hub checkpoints do)
    save_file({k: v.clone() for k, v in make_tiny_llama(64).state_dict().items()}, tmp_path / "b" / "model.safetensors")
    adapted = _perturbed(make_tiny_llama(64))
    adapted.config.tie_word_embeddings = False
    adapted.lm_head.weight = torch.nn.Parameter(adapted.model.embed_tokens.weight.detach().clone() * 2)
    adapted.save_pretrained(tmp_path / "a")
    (tmp_path / "o").mkdir()
    # base ties (no lm_head.weight saved by transformers), adapted unties: the head starts from the embedding
    make_tiny_llama(64).save_pretrained(tmp_path / "tied")
    summary = merge_checkpoints(tmp_path / "tied", tmp_path / "a", tmp_path / "o", 0.0)
    assert summary.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(_weights(tmp_path / "o")["lm_head.weight"], _weights(tmp_path / "tied")
                       ["model.embed_tokens.weight"])
    # base stores its (tied) head, adapted is saved tied: the output follows the adapted model
    make_tiny_llama(64, seed=3).save_pretrained(tmp_path / "a2")
    (tmp_path / "o2").mkdir()
    summary = merge_checkpoints(tmp_path / "b", tmp_path / "a2", tmp_path / "o2", 1.0)
    assert summary.dropped == ["lm_head.weight"] and "lm_head.weight" not in _weights(tmp_path / "o2")


def test_other_key_mismatches_are_refused_naming_the_keys(tmp_path):
    base_dir, adapted_dir, out = _pair(tmp_path)
    weights = _weights(adapted_dir)
    weights["model.layers.0.extra.weight"] = torch.zeros(2)
    del weights["model.norm.weight"]
    save_file(weights, adapted_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"only in the adapted model: model\.layers\.0\.extra\.weight; only in the "
                                         r"base: model\.norm\.weight"):
        merge_checkpoints(base_dir, adapted_dir, out, 0.5)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        merge_checkpoints(tmp_path / "nowhere", adapted_dir, out, 0.5)


# --- LoRA -----------------------------------------------------------------------------------------------------------
def _lora(tmp_path, embeddings="none", use_rslora=False, **extra):
    import peft

    base = make_tiny_llama(64)
    base.save_pretrained(tmp_path / "base")
    model = make_tiny_llama(64)
    kwargs = {}
    if embeddings == "all":
        kwargs["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif embeddings == "new_rows":
        kwargs["trainable_token_indices"] = [60, 61, 62]
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=use_rslora,
                             init_lora_weights=False, **kwargs, **extra)
    lora = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every adapter tensor (and each saved module) moves; the base weights do not
        for name, p in lora.named_parameters():
            if any(s in name for s in ("lora_", "modules_to_save", "trainable_tokens_delta")):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload()
    return tmp_path / "base", tmp_path / "adapter", merged


@pytest.mark.parametrize("embeddings,rslora", [("none", False), ("none", True), ("all", False), ("new_rows", False)])
def test_lora_merge_matches_peft_merge_and_unload(tmp_path, embeddings, rslora):
    import peft  # noqa: F401

    base_dir, adapter_dir, reference = _lora(tmp_path, embeddings, rslora)
    out = tmp_path / "out"
    out.mkdir()
    summary = merge_lora_checkpoint(base_dir, adapter_dir, out, 1.0)
    assert summary.lora_modules == 14
    merged = _weights(out)
    want = reference.state_dict()
    if embeddings == "all":  # peft unties the saved head from the embedding; so does the merge
        assert not reference.config.tie_word_embeddings and summary.tied == {"lm_head.weight":
                                                                              "model.embed_tokens.weight"}
    else:
        want.pop("lm_head.weight")  # tied: not stored
    assert set(merged) == set(want)
    for k, v in merged.items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-6, msg=k)
    (tmp_path / "zero").mkdir()
    merge_lora_checkpoint(base_dir, adapter_dir, tmp_path / "zero", 0.0)
    base = _weights(base_dir)
    assert all(torch.equal(v, base[summary.tied.get(k, k)]) for k, v in _weights(tmp_path / "zero").items())


def test_lora_scale_and_refusals(tmp_path):
    assert lora_scale(16, 4) == 4 and lora_scale(16, 4, use_rslora=True) == 8
    base_dir, adapter_dir, _ = _lora(tmp_path, use_dora=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora_checkpoint(base_dir, adapter_dir, tmp_path / "out", 1.0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora_checkpoint(base_dir, base_dir, tmp_path / "out", 1.0)


def test_lora_on_embeddings_is_refused(tmp_path):
    import peft

    make_tiny_llama(64).save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(make_tiny_llama(64), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="only Linear LoRA"):
        merge_lora_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", 1.0)


def test_the_writer_holds_one_produced_tensor_at_a_time(tmp_path):
    import gc
    import weakref

    specs = {f"t{i}": (torch.float32, (64, 64)) for i in range(6)}
    alive: list[weakref.ref] = []

    def produce(key):
        gc.collect()
        assert all(r() is None for r in alive), "an earlier tensor is still referenced"
        t = torch.full((64, 64), float(key[1:]))
        alive.append(weakref.ref(t))
        return t

    write_safetensors(tmp_path / "x.safetensors", specs, produce)
    assert len(alive) == 6 and load_file(tmp_path / "x.safetensors")["t5"].eq(5).all()
