"""Pareto front, knee and `--pick` rules of a merge sweep, against hand-worked rows."""

from __future__ import annotations

import pytest

from hf_cpt.merge_sweep import knee_point, pareto_front, parse_pick, pick_row, plot_merge_sweep, sweep_table


def _rows(points):
    return [{"alpha": a, "kl": kl, "domain_loss": d} for a, kl, d in points]


ROWS = _rows([(0.0, 0.0, 3.0), (0.25, 0.05, 2.2), (0.5, 0.1, 2.0), (0.75, 0.3, 1.95), (1.0, 0.6, 1.9),
              (0.6, 0.4, 2.5)])  # the last is dominated by alpha 0.75


def test_pareto_front_is_the_undominated_rows_by_kl():
    assert pareto_front(ROWS) == [0, 1, 2, 3, 4]
    assert pareto_front(_rows([(0, 1.0, 1.0), (1, 1.0, 1.0)])) == [0, 1]  # ties dominate neither


def test_knee_is_the_front_point_farthest_from_the_chord():
    # normalised front (0, 1), (1/12, 0.273), (1/6, 0.0909), (0.5, 0.0455), (1, 0); distance to the chord
    # x + y = 1 is 0, 0.455, 0.525, 0.322, 0: the knee is alpha 0.5
    assert knee_point(ROWS) == 2
    assert knee_point(_rows([(0, 0.0, 2.0), (1, 0.5, 1.0)])) == 0  # two points: the one nearer the base


def test_pick_rules():
    assert parse_pick(" kl <= 0.15 ") == ("kl", 0.15) and parse_pick("alpha=0.5") == ("alpha", 0.5)
    assert pick_row(ROWS, "kl<=0.15") == 2 and pick_row(ROWS, "kl<=10") == 4 and pick_row(ROWS, "alpha=0.75") == 3
    assert pick_row(ROWS, "knee") == 2
    for bad in ("best", "kl<=-1", "kl<=nan", "alpha=", "kl<0.1"):
        with pytest.raises(ValueError, match="`pick` must be"):
            parse_pick(bad)
    assert pick_row(_rows([(0, 0.0, 1.0)]), "kl<=0") == 0
    with pytest.raises(ValueError, match=r"the lowest is 0.1, at alpha 0\)"):
        pick_row(_rows([(0.5, 0.2, 1.0), (0, 0.1, 2.0)]), "kl<=0.05")
    with pytest.raises(ValueError, match="not in the sweep"):
        pick_row(ROWS, "alpha=0.3")


def test_table_and_plot(tmp_path):
    rows = [dict(r, general_loss=1.0) for r in ROWS]
    text = sweep_table(rows, picked=2)
    assert "general loss" in text and text.count("*") == 5 and text.splitlines()[4].endswith("<- picked")
    assert plot_merge_sweep(rows, tmp_path / "p.png", picked=2).stat().st_size > 1000
