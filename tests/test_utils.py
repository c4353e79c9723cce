import importlib

import pytest
import torch

from hf_cpt.utils import atomic_output_dir, get_processing_class, unwrap_model


def test_atomic_output_dir_moves_into_place_on_success(tmp_path):
    final = tmp_path / "run"
    with atomic_output_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "run") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_non_empty_unless_overwrite(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_output_dir(final):
            pass
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old result
        with atomic_output_dir(final, overwrite=True):
            raise RuntimeError
    assert (final / "old.txt").exists()
    with atomic_output_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_unwrap_model_and_processing_class():
    inner = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.module = inner
    assert unwrap_model(wrapped) is inner and unwrap_model(inner) is inner
    assert get_processing_class({"processing_class": 1, "tokenizer": 2}) == 1
    assert get_processing_class({"tokenizer": 2}) == 2


def test_public_api_and_functional_page_resolve():
    import inspect

    import hf_cpt
    import hf_cpt.functional as F

    assert len(hf_cpt.__all__) == len(set(hf_cpt.__all__))
    for name in hf_cpt.__all__[1:]:
        obj = getattr(hf_cpt, name)
        module = hf_cpt._EXPORTS[name]
        assert name in dir(importlib.import_module(f"hf_cpt.{module}"))
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("hf_cpt."), name  # ours, not a re-exported third-party name
            assert obj.__name__ == name and (obj.__doc__ or "").strip(), f"{name} needs a docstring"
    for group in hf_cpt._GROUPS.values():  # every group names something a user imports
        assert group
    for name in F.__all__:
        fn = getattr(F, name)
        assert inspect.isfunction(fn) and fn.__name__ == name, name
        assert (fn.__doc__ or "").strip(), f"{name} needs a docstring"
        # a pure core: no Trainer or TrainingArguments in its signature
        assert "Trainer" not in str(inspect.signature(fn)), name
    assert set(F.__all__) == {n for n in dir(F) if not n.startswith("_") and inspect.isfunction(getattr(F, n))}
