"""`kvkata plot`'s figures, in-process: capacities in the unit kvref stores, presets told apart, no spoilers.

The figure is built by kvkata.plots.kv_bytes_figure and read back from matplotlib's artists (its
texts, lines and legend), so each check looks at what is drawn, not at the code that draws it.
The end-to-end run of the command (every PNG written) is checks/test_learner_tools.py's.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest

from kvkata import ROOT, cli, plots
from kvref import roofline
from kvref.config import PRESETS
from kvref.hardware import HARDWARE

pytest.importorskip("matplotlib", reason="kvkata plot needs matplotlib (the dev extra)")


@pytest.fixture(scope="module")
def ax():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plots.kv_bytes_figure()
    yield fig.axes[0]
    plt.close(fig)


def preset_lines(ax) -> dict[str, object]:
    """{legend label: line} of the presets' lines (the device lines have no label)."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_device_lines_are_drawn_and_labelled_in_gib_of_the_capacity_kvref_stores(ax):
    """kvref stores nvidia-smi's MiB (an H100 SXM: 81,559 MiB = 79.6 GiB, not '86 GB')."""
    texts = " | ".join(t.get_text() for t in ax.texts)
    assert " GB" not in texts, texts
    levels = {round(line.get_ydata()[0], 6) for line in ax.get_lines() if len(set(line.get_ydata())) == 1}
    for hw in HARDWARE.values():
        gib = hw.memory_bytes / 2**30
        assert f"{hw.name} {gib:.1f}".removesuffix(".0") + " GiB" in texts, (hw.name, texts)
        assert round(gib, 6) in levels, f"no line at {hw.name}'s {gib} GiB"
    assert "GiB" in ax.get_ylabel()


def test_every_preset_has_a_legend_entry_with_kvrefs_bytes_per_token(ax):
    labels = list(preset_lines(ax))
    for name, cfg in PRESETS.items():
        mine = [label for label in labels if name in label.split(":")[0].split(", ")]
        assert len(mine) == 1, (name, labels)
        assert f"= {roofline.kv_bytes_per_token(cfg, 2) / 1024:,.4g} KiB/token" in mine[0]


def test_presets_whose_lines_nearly_coincide_are_drawn_apart_and_the_figure_says_why(ax):
    lines = preset_lines(ax)
    close = []
    for (a, la), (b, lb) in itertools.combinations(lines.items(), 2):
        ya, yb = la.get_ydata()[0], lb.get_ydata()[0]
        if abs(ya - yb) <= plots.NEAR * max(ya, yb):
            close.append((a.split(":")[0], b.split(":")[0]))
            assert (la.get_linestyle(), la.get_marker()) != (lb.get_linestyle(), lb.get_marker()), (a, b)
    assert ("deepseek-v3", "deepseek-v2") in close  # 61 and 60 layers of the same MLA latent: 1.6% apart
    notes = [t.get_text() for t in ax.texts if "coincide" in t.get_text()]
    for a, b in close:
        assert any(a in note and b in note for note in notes), (a, b, notes)
    assert any("MLA" in note and "61 and 60 layers" in note for note in notes), notes


def test_bench_figures_that_give_answers_away_are_copied_only_with_spoilers(tmp_path):
    benched = {p.name for p in (ROOT / "bench" / "results").glob("*.png")}
    assert set(plots.SPOILERS) <= benched, "a spoiler listed in kvkata/plots.py is no longer in bench/results"
    copied, left_out = plots.copy_bench_figures(tmp_path / "default")
    assert sorted(left_out) == sorted(plots.SPOILERS)
    assert {p.name for p in copied} == {f"bench_{n}" for n in benched - set(plots.SPOILERS)}
    copied, left_out = plots.copy_bench_figures(tmp_path / "all", spoilers=True)
    assert left_out == [] and {p.name for p in copied} == {f"bench_{n}" for n in benched}


def test_the_plot_help_names_the_cards_and_katas_the_spoilers_give_away():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    text = " ".join(out.getvalue().split())
    assert "--spoilers" in text
    for figure, what in plots.SPOILERS.items():
        card, kata = what.split(":")[0].split("'s ")
        assert figure.removesuffix(".png") in text and card in text and kata in text, (figure, text)


def test_plot_backs_up_a_figure_it_replaces_and_refuses_one_outside_the_folder(tmp_path, monkeypatch, capsys):
    """No command overwrites a file without a backup: a second `kvkata plot`, or a folder holding a
    file of the same name, keeps the old file in .kvkata/backups/ (outside the current folder: refused)."""
    from kvkata import backup

    def fake_plot_all(out, spoilers=False):  # what plot_all writes, without drawing it
        out.mkdir(parents=True, exist_ok=True)
        for name in plots.names(spoilers):
            (out / name).write_bytes(b"drawn by kvkata")
        return [out / name for name in plots.names(spoilers)]

    monkeypatch.setattr(plots, "plot_all", fake_plot_all)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "figs").mkdir()
    mine = here / "figs" / plots.FIGURES[1]
    mine.write_bytes(b"my own roofline")
    assert cli.main(["plot", "--out", "figs"]) == 0
    assert "backed up the old roofline.png" in capsys.readouterr().out
    (bid, files), = backup.list_backups(here)
    assert files == [Path("figs") / plots.FIGURES[1]]
    assert (here / ".kvkata" / "backups" / bid / "figs" / plots.FIGURES[1]).read_bytes() == b"my own roofline"
    assert mine.read_bytes() == b"drawn by kvkata"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / plots.FIGURES[0]).write_bytes(b"not kvkata's")
    assert cli.main(["plot", "--out", str(elsewhere)]) == 2
    assert (elsewhere / plots.FIGURES[0]).read_bytes() == b"not kvkata's"
    assert "outside this folder" in capsys.readouterr().err
