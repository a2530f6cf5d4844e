"""The label gallery in a real headless browser (Debian's chromium, driven by Playwright):
it loads with no console errors and no network, hovering a patch shows that patch's words and
scores, and the word search highlights exactly the patches that carry the word."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import shards
from pipeline.gallery import build_gallery, encoder_view

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def page_factory():
    exe = _browser()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (the dev extra installs it)")
    if exe is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium; "
                    "`apt-get install chromium`)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield browser
        browser.close()


def _rows(label_run):
    rows = []
    for p in sorted(Path(label_run).glob("shard-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def test_encoder_view_matches_the_encoder(tiny_clip, sample):
    """The gallery's picture is the encoder's input before normalisation."""
    import torch

    from pipeline.encoders import load_encoder, preprocess_geometry

    enc = load_encoder(tiny_clip)
    _, root = sample
    img = Image.open(next(Path(root).rglob("*.jpg"))).convert("RGB")
    img = img.resize((img.width + 30, img.height))  # not square: the crop matters
    view = torch.from_numpy(np.array(encoder_view(img, preprocess_geometry(enc.preprocess)))).float()
    mean = torch.tensor(enc.preprocess.transforms[-1].mean)[:, None, None]
    std = torch.tensor(enc.preprocess.transforms[-1].std)[:, None, None]
    ref = (enc.preprocess(img) * std + mean) * 255
    assert torch.allclose(view.permute(2, 0, 1), ref, atol=1.0)


def test_gallery_in_a_real_browser(page_factory, label_run, tmp_path):
    from wordlist import load_wordlist

    words = load_wordlist().words
    pages = build_gallery(label_run, tmp_path / "gallery", page_size=10)
    assert [p.name for p in pages] == ["index.html", "page-2.html", "page-3.html"]
    html_text = pages[0].read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained
    rows = _rows(label_run)[:10]
    page = page_factory.new_page(viewport={"width": 1400, "height": 1000})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(pages[0].as_uri())
    assert page.locator("figure").count() == 10
    # hover: the tooltip lists the patch's kept words and scores, best first
    row = rows[3]
    n = len(row["label_ids"]) // (row["grid_h"] * row["grid_w"])
    p = 2 * row["grid_w"] + 1
    page.locator(f'.cell[data-i="3"][data-p="{p}"]').hover()
    tip = page.locator("#tip").inner_text()
    kept = [(words[i], s) for i, s in zip(row["label_ids"][p * n:(p + 1) * n], row["scores"][p * n:(p + 1) * n],
                                          strict=True) if i != shards.SENTINEL]
    lines = tip.splitlines()[1:]
    assert [ln.split()[0] for ln in lines] == [w for w, _ in kept]
    assert [float(ln.split()[1]) for ln in lines] == pytest.approx([s for _, s in kept], abs=1e-3)
    # search: exactly the patches of this page carrying the word, among their kept labels
    word = kept[0][0]
    page.fill("#q", word)
    want = sum(1 for r in rows for q in range(r["grid_h"] * r["grid_w"])
               if words.index(word) in r["label_ids"][q * n:(q + 1) * n])
    assert page.locator(".cell.hit").count() == want > 0
    assert f"{want} patch(es)" in page.locator("#count").inner_text()
    shot = Path(os.environ.get("SEA_SCREENSHOT_DIR", tmp_path)) / "gallery.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    page.click("nav a >> nth=0")  # the next page loads too
    assert page.locator("figure").count() == 10
    assert errors == [] and requests == []
    page.close()


def test_alignment_page_and_curves_in_a_real_browser(page_factory, pretrain_cfg, label_run, tmp_path):
    """Two stage-1 runs side by side: each patch's nearest word in the page is the one an
    independent computation (Eq. 8 table built word by word with the run's label tokenization,
    numpy argmax) gives; the page has
    no console errors; ``trainer plot`` draws the runs' curves from metrics.jsonl."""
    import json

    from pipeline.labelset import LabelSet
    from trainer.final import load_final
    from trainer.report import alignment_page, plot_runs
    from trainer.sea_loss import load_word_tokens
    from trainer.train import train

    runs = []
    for w, tokenization in ((0.0, "space"), (1.0, "bare")):  # the page follows each run's own
        cfg = pretrain_cfg(f"sea.weight={w}", f"log.output={tmp_path / f'run{w:g}'}",
                           f"sea.label_tokenization={tokenization}")
        train(cfg, "pretrain")
        runs.append(cfg.log.output)
    summary = alignment_page(runs, label_run, tmp_path / "align", images=4, names=["lambda0", "lambda1"])
    assert set(summary) == {"lambda0", "lambda1"} and all(0 <= v["in_labels"] <= 1 for v in summary.values())
    html_text = (tmp_path / "align" / "alignment.html").read_text()
    data = json.loads(html_text.split("const DATA = ", 1)[1].split(";\nconst tip", 1)[0])
    ls = LabelSet(label_run)
    words = ls.wordlist.words
    mllm, tok, pre, _ = load_final(runs[1])
    wt = load_word_tokens(tok, ls.wordlist, "bare")
    emb = mllm.llm.get_input_embeddings().weight.detach().numpy()
    flat, offs = wt.flat_ids.numpy(), wt.offsets.numpy()
    ends = list(offs[1:]) + [len(flat)]
    table = np.stack([emb[flat[a:b]].mean(0) for a, b in zip(offs, ends, strict=True)])
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    img = Image.open(Path(json.loads((Path(label_run) / "run.json").read_text())["image_root"])
                     / data["images"][0]["path"]).convert("RGB")
    tokens = mllm.visual_tokens(pre(img)[None]).detach().numpy()[0]
    ref = [words[i] for i in (tokens / np.linalg.norm(tokens, axis=1, keepdims=True) @ table.T).argmax(1)]
    assert data["images"][0]["nearest"][1] == ref
    page = page_factory.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "align" / "alignment.html").as_uri())
    page.locator('.cell[data-i="0"][data-p="5"][data-r="1"]').hover()
    assert f'nearest word "{ref[5]}"' in page.locator("#tip").inner_text()
    assert errors == []
    page.close()
    # at 1400 px with long run names: even image columns, and the rightmost patch's tooltip
    # stays inside the window (screenshot kept beside the page)
    alignment_page(runs * 2, label_run, tmp_path / "wide", images=2,
                   names=["lambda0-a-long-run-name-that-would-widen-its-column", "lambda1", "b", "c"])
    page = page_factory.new_page(viewport={"width": 1400, "height": 900})
    page.goto((tmp_path / "wide" / "alignment.html").as_uri())
    widths = page.eval_on_selector_all("tr:nth-child(2) td.run", "els => els.map(e => e.offsetWidth)")
    assert len(widths) == 5 and max(widths) - min(widths) <= 1, widths
    gw = data["images"][0]["grid"][1]
    page.locator(f'.cell[data-i="0"][data-p="{gw - 1}"][data-r="3"]').hover()
    box = page.eval_on_selector("#tip", "t => { const r = t.getBoundingClientRect(); "
                                        "return [r.left, r.right, r.top, r.bottom, innerWidth, innerHeight]; }")
    assert box[0] >= 0 and box[1] <= box[4] and box[2] >= 0 and box[3] <= box[5], box
    page.screenshot(path=str(tmp_path / "wide" / "hover-1400.png"))
    page.close()
    png = plot_runs(runs, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000
    assert all("time" in json.loads(x) for x in (Path(runs[0]) / "metrics.jsonl").read_text().splitlines())


def test_gallery_with_nothing_to_show_is_an_error(label_run, tmp_path):
    with pytest.raises(ValueError, match="no labelled image"):
        build_gallery(label_run, tmp_path / "empty", limit=0)
    assert not (tmp_path / "empty" / "index.html").exists()


def test_the_alignment_page_never_guesses_a_runs_label_tokenization(pretrain_cfg, label_run,
                                                                      tmp_path):
    """Issue 36: a final/ without ``label_tokenization`` (written before the field) is refused
    with the fix, not tokenized one fixed way."""
    import json

    from trainer.report import alignment_page
    from trainer.train import train

    run = train(pretrain_cfg("optim.max_steps=1", f"log.output={tmp_path / 'r'}"), "pretrain")
    meta_path = Path(run["final"]) / "sea_model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["label_tokenization"] == "space"
    del meta["label_tokenization"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='add "label_tokenization": "space"'):
        alignment_page([run["final"]], label_run, tmp_path / "page", images=2)
