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


def test_each_guard_is_drawn_on_its_own_sets_panel_labelled(tmp_path, monkeypatch):
    """Two guards: the KL bound on general_self on the KL panel, the loss bound on general on the loss panel, each
    labelled with its set, its bound and whether it held; none on the domain panel."""
    import hf_cpt.plotting as plotting

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: figures.append(fig) or path)
    guards = [{"guarded_set": "general_self", "tolerance_metric": "kl", "tolerance": 0.2, "tolerance_mode": "absolute",
               "tolerance_breached": False},
              {"guarded_set": "general", "tolerance_metric": "loss", "tolerance": 0.1, "tolerance_mode": "absolute",
               "tolerance_breached": True}]
    plot_forgetting(HISTORY, tmp_path / "g.png", general="general_self", guards=guards)
    loss_ax, domain_ax, kl_ax = figures[0].axes

    def bounds(ax):
        return {line.get_label(): line.get_ydata()[0] for line in ax.lines if line.get_label().startswith("guard")}

    assert bounds(loss_ax) == {"guard: general loss ≤ 3.400, breached": 3.4}
    assert bounds(kl_ax) == {"guard: general_self KL ≤ 0.200, held": 0.2}
    assert bounds(domain_ax) == {}
    # the single-guard arguments of earlier versions draw the same kind of line
    plot_forgetting(HISTORY, tmp_path / "one.png", tolerance=0.1, tolerance_mode="relative")
    assert list(bounds(figures[1].axes[0])) == ["guard: general loss ≤ 3.630"]
