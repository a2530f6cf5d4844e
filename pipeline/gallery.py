"""A static, self-contained HTML gallery of a label run (``python -m pipeline gallery``).

Each image is shown as the encoder saw it: the run's own resize and centre crop (``crop`` in
the shard metadata, replayed with the same torchvision transforms), so the patch grid drawn
over it is exact. Hovering (or tapping) a patch lists its kept words and scores; the search
box highlights every patch of the page that carries a word among its kept labels. Pages
hold ``page_size`` images each; images are embedded as PNG data URIs and the script is
inline, so a page opens from disk with no network at all.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from pipeline import shards
from pipeline.labelset import LabelSet

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
header{display:flex;gap:1em;align-items:center;flex-wrap:wrap;margin-bottom:1em}
#q{font-size:1em;padding:.3em .5em;width:14em}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;background:#fff;padding:6px;border:1px solid #ddd;border-radius:4px}
figcaption{font-size:.75em;max-width:%(px)dpx;overflow-wrap:anywhere}
.img{position:relative;width:%(px)dpx;height:%(px)dpx}
.img img{width:100%%;height:100%%;image-rendering:pixelated;display:block}
.cells{position:absolute;inset:0;display:grid}
.cell{border:1px solid rgba(255,255,255,.35);box-sizing:border-box;cursor:pointer}
.cell:hover,.cell.sel{outline:2px solid #ff0;z-index:2}
.cell.hit{background:rgba(255,0,140,.45);outline:1px solid #ff008c}
#tip{position:fixed;pointer-events:none;background:#111;color:#fff;font-size:12px;padding:6px 8px;
 border-radius:4px;display:none;z-index:10;white-space:pre;font-family:ui-monospace,monospace}
nav a{margin-right:.6em}
"""

_JS = """
const W = DATA.words, tip = document.getElementById('tip'), q = document.getElementById('q'),
      count = document.getElementById('count');
function show(cell, x, y) {
  const im = DATA.images[+cell.dataset.i], labels = im.labels[+cell.dataset.p];
  const r = Math.floor(cell.dataset.p / im.grid[1]), c = cell.dataset.p % im.grid[1];
  tip.textContent = im.path + '  patch ' + r + ',' + c + '\\n' + (labels.length ?
    labels.map(l => W[l[0]].padEnd(16) + ' ' + l[1].toFixed(4)).join('\\n') : '(no kept label)');
  tip.style.left = (x + 14) + 'px'; tip.style.top = (y + 14) + 'px'; tip.style.display = 'block';
}
document.querySelectorAll('.cell').forEach(cell => {
  cell.addEventListener('mousemove', e => show(cell, e.clientX, e.clientY));
  cell.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  cell.addEventListener('click', e => {
    document.querySelectorAll('.cell.sel').forEach(s => s.classList.remove('sel'));
    cell.classList.add('sel'); show(cell, e.clientX, e.clientY);
  });
});
function search() {
  const w = q.value.trim().toLowerCase(), id = W.indexOf(w);
  let n = 0;
  document.querySelectorAll('.cell').forEach(cell => {
    const labels = DATA.images[+cell.dataset.i].labels[+cell.dataset.p];
    const hit = id >= 0 && labels.some(l => l[0] === id);
    cell.classList.toggle('hit', hit); n += hit;
  });
  count.textContent = w ? n + ' patch(es) on this page carry "' + w + '"' : '';
}
q.addEventListener('input', search);
"""


def encoder_view(image, crop: dict):
    """The image as the encoder saw it (before normalisation), from the run's ``crop``."""
    from torchvision import transforms as T

    if crop.get("other"):
        raise ValueError(f"the run's preprocessing uses {crop['other']}, which the gallery does "
                         f"not replay")
    steps = []
    if crop.get("resize") is not None:
        interp = T.InterpolationMode(crop.get("interpolation") or "bicubic")
        steps.append(T.Resize(crop["resize"], interpolation=interp))
    if crop.get("center_crop"):
        steps.append(T.CenterCrop(crop["center_crop"]))
    return T.Compose(steps)(image) if steps else image


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_gallery(shard_dir: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                  limit: int | None = None, page_size: int = 48, px: int = 256,
                  wordlist: str | Path | None = None) -> list[Path]:
    """Write ``index.html`` (page 1) and ``page-N.html``; -> the page paths."""
    from pipeline.data import MAX_PIXELS, load_rgb, resolve_inside

    ls = LabelSet(shard_dir, wordlist)
    root, crop = ls.image_root(image_root), ls.crop
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages: list[list[dict]] = [[]]
    done = 0
    for rb, ids, scores in ls.batches():
        for i, path in enumerate(rb.column("path").to_pylist()):
            if limit is not None and done >= limit:
                break
            view = encoder_view(load_rgb(resolve_inside(root, path), MAX_PIXELS), crop)
            kept = ids[i] != shards.SENTINEL
            labels = [[[int(w), round(float(sc), 4)] for w, sc, k in zip(ids[i][p], scores[i][p], kept[p], strict=True) if k]
                      for p in range(ids.shape[1])]
            if len(pages[-1]) == page_size:
                pages.append([])
            pages[-1].append({"path": path, "id": rb.column("image_id")[i].as_py(),
                              "grid": [int(rb.column("grid_h")[i].as_py()), int(rb.column("grid_w")[i].as_py())],
                              "uri": data_uri(view), "labels": labels})
            done += 1
    if done == 0:
        raise ValueError(f"{shard_dir}: no labelled image to show (limit {limit})")
    names = ["index.html"] + [f"page-{k}.html" for k in range(2, len(pages) + 1)]
    for k, (name, items) in enumerate(zip(names, pages, strict=True)):
        (out / name).write_text(_page(ls, items, names, k, px))
    return [out / n for n in names]


def _page(ls: LabelSet, items: list[dict], names: list[str], k: int, px: int) -> str:
    # words of this page only, re-indexed: the page carries its own small table
    used = sorted({w for it in items for lab in it["labels"] for w, _ in lab})
    remap = {w: j for j, w in enumerate(used)}
    data = {"words": [ls.wordlist.words[w] for w in used], "images": [
        {"path": it["path"], "grid": it["grid"],
         "labels": [[[remap[w], s] for w, s in lab] for lab in it["labels"]]} for it in items]}
    figs = []
    for i, it in enumerate(items):
        gh, gw = it["grid"]
        cells = "".join(f'<div class="cell" data-i="{i}" data-p="{p}"></div>' for p in range(gh * gw))
        figs.append(
            f'<figure><div class="img"><img src="{it["uri"]}" alt="{html.escape(it["path"])}">'
            f'<div class="cells" style="grid-template-columns:repeat({gw},1fr);'
            f'grid-template-rows:repeat({gh},1fr)">{cells}</div></div>'
            f'<figcaption>{html.escape(it["path"])} (id {html.escape(str(it["id"]))})</figcaption></figure>')
    nav = " ".join(f'<a href="{n}">{j + 1}</a>' if j != k else f"<b>{j + 1}</b>" for j, n in enumerate(names))
    m = ls.meta
    title = f"SEA labels: {html.escape(str(ls.dir.name))}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS % {'px': px}}</style></head><body><header><h2 style='margin:0'>{title}</h2>"
            f"<span>mode <b>{html.escape(str(m.get('mode')))}</b>, top {m['top_n']}, "
            f"{html.escape(str(m.get('encoder')))}, grid {m['grid'][0]}x{m['grid'][1]}</span>"
            f"<input id='q' placeholder='search a word' autocomplete='off'><span id='count'></span>"
            f"<nav>page {nav}</nav></header><div class='grid'>{''.join(figs)}</div><div id='tip'></div>"
            f"<script>const DATA = {json.dumps(data, separators=(',', ':'))};{_JS}</script></body></html>")
