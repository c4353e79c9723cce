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
    import hf_cpt
    import hf_cpt.functional as F

    for name in hf_cpt.__all__:
        assert getattr(hf_cpt, name) is not None
    for name in F.__all__:
        assert callable(getattr(F, name))
