"""Weight-decay groups (no decay on embeddings, norms, biases) and freezing the bottom layers."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_cpt.config import CPTConfig
from hf_cpt.param_groups import decay_parameter_names, freeze_bottom_layers, layer_stack
from hf_cpt.testing import make_tiny_llama
from tests.conftest import tiny_run_dict


def _naive_decay_names(model, decay_embeddings=False):
    """The rule spelled out by hand: weight matrices of attention/MLP layers (2-D, not an embedding)."""
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            emb.add(id(m.weight))
    out = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.endswith(".bias"):
            continue  # norm gains and biases are vectors
        if id(p) in emb and not decay_embeddings:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_names_match_a_naive_rule_on_llama_and_gpt2(decay_embeddings):
    llama = make_tiny_llama(97, hidden_size=12, num_layers=3)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=53, n_embd=12, n_layer=2, n_head=2, n_positions=17))
    for model in (llama, gpt2):
        assert decay_parameter_names(model, decay_embeddings) == _naive_decay_names(model, decay_embeddings)
    names = decay_parameter_names(gpt2)
    assert "transformer.wpe.weight" not in names and "transformer.h.0.attn.c_attn.bias" not in names
    assert "transformer.h.0.ln_1.weight" not in names and "transformer.h.1.mlp.c_fc.weight" in names


def test_freezing_the_bottom_layers_freezes_exactly_those():
    model = make_tiny_llama(97, hidden_size=12, num_layers=3)
    frozen = freeze_bottom_layers(model, 2)
    assert frozen and all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith(("model.layers.0.", "model.layers.1.")) for n in trainable)
    assert any(n.startswith("model.layers.2.") for n in trainable) and "model.embed_tokens.weight" in trainable
    assert len(layer_stack(model)) == 3
    with pytest.raises(ValueError, match=r"`train.freeze_layers` is 4 but the model has 3 layers"):
        freeze_bottom_layers(make_tiny_llama(97, hidden_size=12, num_layers=3), 4)


def test_the_fields_are_checked_where_declared(tiny_model_dir):
    run = tiny_run_dict(tiny_model_dir)
    with pytest.raises(ValueError, match=r"`train.freeze_layers`"):
        CPTConfig.from_dict({**run, "train": {**run["train"], "freeze_layers": -1}})
    with pytest.raises(ValueError, match=r"`train.freeze_layers` is 1 but `train.trainable` is 'embeddings'"):
        CPTConfig.from_dict({**run, "train": {**run["train"], "freeze_layers": 1, "trainable": "embeddings"}})
    with pytest.raises(ValueError, match=r"`train.decay_embeddings` must be true or false"):
        CPTConfig.from_dict({**run, "train": {**run["train"], "decay_embeddings": "yes"}})


def _trainer(cfg, tmp_path):
    from hf_cpt.recipe.train import build_data, build_model, build_trainer, build_training_args, preflight

    args = build_training_args(cfg, tmp_path / "ckpt")
    model, tokenizer, _ = build_model(cfg)
    preflight(cfg, model, args)
    return build_trainer(cfg, args, model, tokenizer, build_data(cfg, model, tokenizer, args))


def _group_decay(trainer):
    return {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("schedule", [None, {"schedule": "rewarm", "warmup_steps": 1, "embedding_lr_ratio": 2.0}])
def test_a_run_decays_matrices_only_and_leaves_frozen_layers_untouched(tiny_model_dir, tmp_path, schedule):
    run = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2, weight_decay=0.5, freeze_layers=1,
                        learning_rate=1e-2)
    if schedule:  # the schedule block sets the LR
        run = {**run, "train": {**run["train"], "lr_scheduler_type": None}, "schedule": schedule}
    cfg = CPTConfig.from_dict(run)
    trainer = _trainer(cfg, tmp_path)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    decay = _group_decay(trainer)
    params = dict(model.named_parameters())
    assert decay[id(params["model.embed_tokens.weight"])] == 0.0  # tied with the head: one parameter
    assert decay[id(params["model.norm.weight"])] == 0.0
    assert decay[id(params["model.layers.1.mlp.up_proj.weight"])] == 0.5
    for name, p in params.items():
        if name.startswith("model.layers.0."):
            assert not p.requires_grad and id(p) not in decay  # no optimizer state for frozen layers
            assert torch.equal(p, before[name]), name
    assert not torch.equal(params["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    if schedule:  # the rewarming optimizer keeps its embedding LR group, now without decay
        emb = id(params["model.embed_tokens.weight"])
        (emb_group,) = [g for g in trainer.optimizer.param_groups if emb in {id(p) for p in g["params"]}]
        assert emb_group["weight_decay"] == 0.0
        assert emb_group["lr"] == pytest.approx(2 * trainer.optimizer.param_groups[0]["lr"])


def test_decay_embeddings_restores_the_trainer_rule(tiny_model_dir, tmp_path):
    run = tiny_run_dict(tiny_model_dir, max_steps=1, eval_steps=1, weight_decay=0.1, decay_embeddings=True)
    trainer = _trainer(CPTConfig.from_dict(run), tmp_path)
    trainer.create_optimizer()
    params = dict(trainer.model.named_parameters())
    assert _group_decay(trainer)[id(params["model.embed_tokens.weight"])] == 0.1


def test_the_card_says_what_decays_and_what_is_frozen():
    from hf_cpt.param_groups import TECHNIQUE

    lines = TECHNIQUE.card({"train": {"weight_decay": 0.1, "freeze_layers": 2}}, {})
    assert lines == ["weight decay 0.1 on weight matrices; none on embeddings, norms or biases",
                     "bottom 2 transformer layers frozen"]
    assert TECHNIQUE.card({"train": {"weight_decay": 0.0}}, {}) == []


def test_a_lora_models_token_rows_are_embeddings_too():
    pytest.importorskip("peft")
    from hf_cpt.adapters import add_lora_for_cpt

    model = make_tiny_llama(100, hidden_size=8, num_layers=1)
    model.resize_token_embeddings(104, mean_resizing=False)
    lora = add_lora_for_cpt(model, r=2, embeddings="new_rows", new_token_ids=[100, 101, 102, 103])
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    names = set(decay_parameter_names(lora)) & trainable
    assert names and all("lora_" in n for n in names)  # of what trains, only the adapter matrices decay
    assert any("trainable_tokens_delta" in n for n in decay_parameter_names(lora, decay_embeddings=True))
