"""`trainer plot`: one colour per run across every panel and one legend naming every run, also
when a run has no curve in some panel (lambda = 0 has no temperature)."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")


def _run(path, with_tau):
    path.mkdir(parents=True)
    rows = [{"kind": "train", "step": s, "loss": 3 - s / 10, "lr": 1e-3,
             **({"align_loss": 5.0, "tau": 1.0 - s / 100} if with_tau else {})} for s in range(1, 6)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_colours_follow_the_run_in_every_panel(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from trainer.report import plot_runs

    runs = [_run(tmp_path / "lambda0", False), _run(tmp_path / "sea", True),
            _run(tmp_path / "sea-tau007", True)]
    seen = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (seen.append(self), real(self, *a, **k)))
    plot_runs(runs, tmp_path / "curves.png")
    fig = seen[0]
    colour = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            assert colour.setdefault(line.get_label(), line.get_color()) == line.get_color(), line.get_label()
    assert len(set(colour.values())) == 3
    tau_panel = next(ax for ax in fig.axes if ax.get_title() == "temperature")
    assert [ln.get_label() for ln in tau_panel.get_lines()] == ["sea", "sea-tau007"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lambda0", "sea", "sea-tau007"]
