"""`vocab_corpora`: which texts a run's `vocab:` block reads, so its reports compare across inits."""

from __future__ import annotations

from hf_cpt.config import CPTConfig
from hf_cpt.recipe.vocab import vocab_corpora
from hf_cpt.testing import read_embedded

from ..conftest import tiny_run_dict


def test_general_fertility_sample_is_the_held_out_set_whatever_the_init(tiny_model_dir):
    d = tiny_run_dict(tiny_model_dir)
    kjv_eval = read_embedded("kjv", "validation")[:200]
    for init, vectors_from_train in [("subword_mean", False), ("distill", False), ("ofa", True)]:
        d["vocab"] = {"n_new_tokens": 10, "init": init}
        domain, general, heldout, general_heldout = vocab_corpora(CPTConfig.from_dict(d))
        assert domain == read_embedded("python-docs") and heldout == read_embedded("python-docs", "validation")
        assert general_heldout == kjv_eval  # the general fertility report: the same texts for every init
        assert (general == read_embedded("kjv")) if vectors_from_train else general == []
    d["vocab"] = {"n_new_tokens": 10, "init": "ofa", "word_vectors": "vectors.txt"}
    assert vocab_corpora(CPTConfig.from_dict(d))[1] == []  # vectors given: the general corpus is not read
    d["data"]["general"] = {"train": "self", "eval": "embedded:kjv/validation"}
    d["data"]["synth"] = {"train_tokens": 1000}
    # replayed text the model writes itself does not exist yet: OFA's vectors come from the domain text alone
    assert vocab_corpora(CPTConfig.from_dict(d))[1::2] == ([], kjv_eval)
    d["data"]["general"] = None
    d["data"]["synth"] = None
    d["data"]["replay_ratio"] = 0.0
    d["vocab"] = {"n_new_tokens": 10, "init": "ofa"}
    assert vocab_corpora(CPTConfig.from_dict(d))[1:] == ([], read_embedded("python-docs", "validation"), None)
