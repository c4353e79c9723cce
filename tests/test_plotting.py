"""The forgetting plot and history table: every held-out set, and a KL panel when the KL was measured."""

from __future__ import annotations

import matplotlib.image

from hf_cpt.plotting import format_history_table, plot_forgetting

HISTORY = [
    {"step": 0, "general_loss": 3.3, "general_self_loss": 3.6, "domain_loss": 3.2, "general_kl": 0.0,
     "general_self_kl": 0.0, "general_top1_agree": 1.0, "general_self_top1_agree": 1.0},
    {"step": 10, "general_loss": 3.1, "general_self_loss": 3.7, "domain_loss": 3.0, "general_kl": 0.3,
     "general_self_kl": 0.15, "general_top1_agree": 0.7, "general_self_top1_agree": 0.8},
]


def test_plot_has_a_kl_panel_only_when_the_kl_was_measured(tmp_path):
    with_kl = matplotlib.image.imread(plot_forgetting(HISTORY, tmp_path / "kl.png", tolerance=0.1))
    plain = [{k: v for k, v in r.items() if k.endswith("_loss") or k == "step"} for r in HISTORY]
    without = matplotlib.image.imread(plot_forgetting(plain, tmp_path / "plain.png"))
    assert with_kl.shape[0] == without.shape[0]
    assert abs(with_kl.shape[1] / without.shape[1] - 1.5) < 0.02  # three panels instead of two
    empty = matplotlib.image.imread(plot_forgetting([], tmp_path / "empty.png"))
    assert empty.shape == without.shape


def test_history_table_rows():
    table = format_history_table(HISTORY).splitlines()
    assert table[0].startswith("| step | general loss | domain loss |") and len(table) == 4
    assert table[2] == "| 0 | 3.3000 | 3.2000 |" and table[3] == "| 10 | 3.1000 | 3.0000 |"
