"""Seeing alignment (the paper's Figure 1) and training curves.

- ``alignment_page``: for the first held-out images of a label run, each visual token's
  nearest word over the whole list in the LLM's input-embedding space (cosine against the
  Eq. 8 label features, as ``eval-align``), beside the patch's labels, for one or more runs
  side by side (``python -m trainer report``). A static, self-contained HTML page.
- ``plot_runs``: loss, L_a, temperature, learning rate and the eval-align curves of one or
  more runs from their ``metrics.jsonl`` (``python -m trainer plot``).
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import torch

from pipeline import shards
from trainer.runlog import read_metrics

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
table{border-collapse:collapse;table-layout:fixed}td,th{padding:4px 8px;vertical-align:top}
th.run,td.run{width:%(px)dpx;overflow-wrap:anywhere}td.path{font-size:12px;overflow-wrap:anywhere}
.img{position:relative;width:%(px)dpx;height:%(px)dpx}
.img img{width:100%%;height:100%%;image-rendering:pixelated;display:block}
.cells{position:absolute;inset:0;display:grid}
.cell{box-sizing:border-box;border:1px solid rgba(255,255,255,.3);cursor:pointer}
.top1{background:rgba(0,200,0,.55)}.inl{background:rgba(160,230,0,.4)}.miss{background:rgba(0,0,0,.35)}
.cell:hover{outline:2px solid #ff0}
#tip{position:fixed;pointer-events:none;background:#111;color:#fff;font-size:12px;padding:6px 8px;
 border-radius:4px;display:none;white-space:pre;font-family:ui-monospace,monospace;z-index:5}
"""

_JS = """
const tip = document.getElementById('tip');
document.querySelectorAll('.cell').forEach(c => {
  c.addEventListener('mousemove', e => {
    const im = DATA.images[+c.dataset.i], p = +c.dataset.p, r = c.dataset.r;
    let t = im.path + '  patch ' + Math.floor(p / im.grid[1]) + ',' + (p % im.grid[1]) +
            '\\nlabels: ' + (im.labels[p].join(', ') || '(none kept)');
    if (r !== undefined) t += '\\n' + DATA.runs[+r] + ': nearest word "' + im.nearest[+r][p] + '"';
    tip.textContent = t; tip.style.display = 'block';
    // beside the cursor, flipped to its other side where the window ends (the rightmost
    // column's tip used to run off screen)
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let x = e.clientX + 14, y = e.clientY + 14;
    if (x + w > window.innerWidth - 4) x = Math.max(4, e.clientX - 14 - w);
    if (y + h > window.innerHeight - 4) y = Math.max(4, e.clientY - 14 - h);
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  });
  c.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
});
"""


def alignment_page(runs: list[str | Path], shard_dir: str | Path, out_dir: str | Path,
                   images: int = 16, image_root: str | Path | None = None,
                   names: list[str] | None = None, px: int = 224,
                   wordlist: str | Path | None = None) -> dict:
    """Write ``out_dir/alignment.html``; -> the figures it shows (per run: share of shown
    patches whose nearest word is the top-1 label / among the kept labels)."""
    from pipeline.data import MAX_PIXELS, load_rgb, resolve_inside
    from pipeline.gallery import data_uri, encoder_view
    from pipeline.labelset import LabelSet
    from trainer.align_eval import label_hits, nearest_words, word_table
    from trainer.final import load_final
    from trainer.sea_loss import load_word_tokens

    ls = LabelSet(shard_dir, wordlist)
    root, crop = ls.image_root(image_root), ls.crop
    rows = []  # the first labelled rows: the images eval-align holds out
    for rb, ids, _ in ls.batches():
        for i, path in enumerate(rb.column("path").to_pylist()):
            if len(rows) < images:
                rows.append((path, ids[i], [int(rb.column("grid_h")[i].as_py()), int(rb.column("grid_w")[i].as_py())]))
        if len(rows) >= images:
            break
    words = ls.wordlist.words
    pics = [load_rgb(resolve_inside(root, p), MAX_PIXELS) for p, _, _ in rows]
    names = names or [Path(r).name for r in runs]
    nearest, summary = [], {}
    for run, name in zip(runs, names, strict=True):
        mllm, tok, preprocess, meta = load_final(run)
        if "label_tokenization" not in meta:  # written before the field existed: never guess
            raise ValueError(f"{run}: sea_model.json does not say how the run tokenized the label "
                             f"words; add \"label_tokenization\": \"space\" (or \"bare\": the run's "
                             f"sea.label_tokenization, in its config) to it")
        wt = load_word_tokens(tok, ls.wordlist, meta["label_tokenization"])
        with torch.inference_mode():
            near = nearest_words(mllm, word_table(mllm, wt),
                                 torch.stack([preprocess(p) for p in pics]))[1].cpu()
        nearest.append(near)
        # torch.tensor copies: the label arrays are Arrow's read-only buffers
        top1, within, n = label_hits(near, torch.stack([torch.tensor(ids) for _, ids, _ in rows]))
        summary[name] = {"patches": n, "top1_match": top1 / max(1, n), "in_labels": within / max(1, n)}
    data = {"runs": names, "images": []}
    trs = []
    for i, ((path, ids, grid), pic) in enumerate(zip(rows, pics, strict=True)):
        labels = [[words[int(w)] for w in ids[p] if w != shards.SENTINEL] for p in range(ids.shape[0])]
        data["images"].append({"path": path, "grid": grid, "labels": labels,
                               "nearest": [[words[int(w)] for w in nr[i]] for nr in nearest]})
        uri = data_uri(encoder_view(pic, crop))
        cols = [_panel(uri, i, grid, None, None, px)]
        for r, nr in enumerate(nearest):
            cls = ["top1" if labels[p] and words[int(nr[i][p])] == labels[p][0] else
                   "inl" if words[int(nr[i][p])] in labels[p] else "miss" for p in range(len(labels))]
            cols.append(_panel(uri, i, grid, r, cls, px))
        trs.append("<tr>" + "".join(f"<td class='run'>{c}</td>" for c in cols)
                   + f"<td class='path'>{html.escape(path)}</td></tr>")
    head = "<tr><th class='run'>image (encoder's view)</th>" + "".join(
        f"<th class='run'>{html.escape(n)}<br><small>top-1 match {summary[n]['top1_match']:.3f}, in labels "
        f"{summary[n]['in_labels']:.3f}</small></th>" for n in names) + "<th></th></tr>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>SEA alignment</title>"
            f"<style>{_CSS % {'px': px}}</style></head><body><h2>Visual tokens' nearest words</h2>"
            f"<p>Held-out images of {html.escape(str(shard_dir))}. Green: the nearest word in the "
            f"LLM's input-embedding space is the patch's top-1 label; light green: one of its kept "
            f"labels; dark: neither (chance for top-1: 1 in {len(words):,}). Hover a patch.</p>"
            f"<table>{head}{''.join(trs)}</table><div id='tip'></div>"
            f"<script>const DATA = {json.dumps(data, separators=(',', ':'))};{_JS}</script></body></html>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.html").write_text(page)
    (out / "alignment.json").write_text(json.dumps(summary, indent=1))
    return summary


def _panel(uri: str, i: int, grid: list[int], run: int | None, cls: list[str] | None, px: int) -> str:
    gh, gw = grid
    attr = "" if run is None else f' data-r="{run}"'
    cells = "".join(f'<div class="cell {cls[p] if cls else ""}" data-i="{i}" data-p="{p}"{attr}></div>'
                    for p in range(gh * gw))
    return (f'<div class="img"><img src="{uri}" alt=""><div class="cells" style="grid-template-columns:'
            f'repeat({gw},1fr);grid-template-rows:repeat({gh},1fr)">{cells}</div></div>')


CURVES = (("loss", "loss (L_g + lambda L_a)"), ("align_loss", "L_a"), ("tau", "temperature"),
          ("lr", "learning rate"), ("in_labels", "eval-align: in labels"),
          ("top1_match", "eval-align: top-1 match"))


def plot_runs(runs: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or [Path(r).name for r in runs]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    handles = {}
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a training run (no metrics.jsonl)")
        lines = read_metrics(path, lambda m: print(m, file=sys.stderr))
        for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
            pts = [(x["step"], x[key]) for x in lines if x.get(key) is not None]
            if pts:  # one colour per run in every panel, whatever panels it has data for
                (h,) = ax.plot(*zip(*pts, strict=True), color=f"C{i % 10}", label=name,
                               marker="o" if len(pts) < 20 else None)
                handles.setdefault(name, h)
            ax.set_title(title)
            ax.set_xlabel("step")
    # one legend for the figure: a run with no temperature (lambda = 0) is still in it
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
               fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
