import pytest
import torch

from hf_cpt.config import CPTConfig
from hf_cpt.liger import resolve_liger
from hf_cpt.testing import make_tiny_llama


def test_auto_falls_back_with_a_reason_and_true_refuses_where_liger_cannot_run(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    assert resolve_liger("false", model) == (False, "Liger kernels off (`use_liger: false`)")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU path is checked by tests/test_gpu.py and bench/gpu_checks.py")
    on, note = resolve_liger("auto", model)
    assert not on and "no CUDA device" in note and "chunked loss" in note
    with pytest.raises(ValueError, match="`use_liger` is true but Liger cannot run here: no CUDA device"):
        resolve_liger(True, model)
    with pytest.raises(ValueError, match="`use_liger` must be auto, true or false"):
        resolve_liger("maybe", model)


def test_yaml_booleans_and_modes_parse():
    cfg = CPTConfig.from_dict({"train": {"use_liger": False, "chunked_loss": "true", "loss_chunk_size": 256}})
    assert cfg.train.use_liger == "false" and cfg.train.chunked_loss == "true"
    with pytest.raises(ValueError, match="`train.chunked_loss` must be auto, true or false"):
        CPTConfig.from_dict({"train": {"chunked_loss": "sometimes"}})
