"""LoRA from YAML (`lora:`): the recipe trains an adapter and ships it merged or alone."""

import pytest
import torch

from hf_cpt.adapters import LoraAdapterConfig
from hf_cpt.config import CPTConfig
from tests.conftest import tiny_run_dict

pytest.importorskip("peft")


def test_the_block_is_checked_where_declared(tiny_model_dir):
    run = tiny_run_dict(tiny_model_dir)
    cfg = CPTConfig.from_dict({**run, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    assert cfg.lora == LoraAdapterConfig(r=4, target_modules=["q_proj", "v_proj"])
    for block, error in [({"r": 0}, r"`lora.r`"), ({"dropout": 1.0}, r"`lora.dropout`"),
                         ({"save": "both"}, r"`lora.save` must be one of merged, adapter"),
                         ({"target_modules": ["lm_head"]}, r"`lora.target_modules` includes lm_head"),
                         ({"embeddings": "new_rows"}, r"`lora.embeddings` is new_rows but there is no `vocab:`")]:
        with pytest.raises(ValueError, match=error):
            CPTConfig.from_dict({**run, "lora": block})
    with pytest.raises(ValueError, match=r"`lora` freezes the base"):
        CPTConfig.from_dict({**run, "train": {**run["train"], "trainable": "embeddings"}, "lora": {}})
    with pytest.raises(ValueError, match=r"`lora`: LoRA from the recipe wraps causal LMs"):
        CPTConfig.from_dict({**run, "objective": "mlm", "lora": {}})


@pytest.mark.slow  # three tiny training runs, one resumed (~10 s each under load)
def test_a_lora_run_ships_the_merged_model_or_the_adapter_and_resumes_exactly(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from hf_cpt.recipe import run_cpt

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    run = tiny_run_dict(tiny_model_dir, max_steps=3, eval_steps=3, learning_rate=5e-2, save_steps=1,
                        keep_checkpoints=True)
    cfg = CPTConfig.from_dict({**run, "lora": {"r": 4, "alpha": 8}})
    merged = run_cpt(cfg, output_dir=tmp_path / "merged")
    # a run killed after its first checkpoint, resumed: the same merged weights, bit for bit
    shutil.copytree(tmp_path / "merged.checkpoints", tmp_path / "resumed.checkpoints",
                    ignore=shutil.ignore_patterns("checkpoint-2", "checkpoint-3"))
    resumed = run_cpt(cfg, output_dir=tmp_path / "resumed", resume=True)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-1")
    again = load_file(str(resumed.output_dir / "model.safetensors"))
    out = merged.output_dir
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").is_file()
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(base)  # a plain checkpoint: no lora_A / lora_B keys
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[key], base[key])  # the adapter was merged in
    assert torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # embeddings: none
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "LoRA: r=4, alpha=8.0" in card and "merged in" in card
    assert merged.metrics["forgetting"]["general_kl_end"] > 0  # KL against the real base, not the wrapped one

    adapter = run_cpt(cfg.override({"lora.save": "adapter", "train.save_steps": 0}),
                      output_dir=tmp_path / "adapter")
    files = {p.name for p in adapter.output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    assert "this is the adapter only" in (adapter.output_dir / "README.md").read_text(encoding="utf-8")


def test_auto_embeddings_train_the_new_rows_of_a_vocabulary_run(tiny_model_dir):
    from hf_cpt.adapters import TECHNIQUE
    from hf_cpt.registry import TrainerParts
    from hf_cpt.testing import make_tiny_llama

    model = make_tiny_llama(100, hidden_size=8, num_layers=1)
    model.resize_token_embeddings(104, mean_resizing=False)
    before = model.get_input_embeddings().weight.detach().clone()
    cfg = CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir), "lora": {"r": 2}})
    parts = TrainerParts(cfg=cfg, args=None, model=model, tokenizer=None, data=None,
                         vocab_summary={"added": 4, "old_vocab_size": 100})
    TECHNIQUE.setup(parts)
    trainable = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable) and any("lora_A" in n for n in trainable)
    delta = next(p for n, p in parts.model.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.shape == (4, before.shape[1])  # the 4 new rows only
