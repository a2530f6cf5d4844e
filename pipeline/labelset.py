"""Reading a label run as words, for people and notebooks: ``python -m pipeline show`` and
``python -m pipeline stats`` are thin wrappers over this module.

    from pipeline.labelset import LabelSet
    ls = LabelSet("shards/run1")              # the word list is found by its hash
    img = ls.image("00000/000000012.jpg")     # by path (the join key) or by image id
    img.top1_grid()                           # [[word, ...], ...] one row per patch row
    img.patch(3, 5)                           # [(word, score), ...] best first

Everything needed comes from the run's own files (manifest, shard metadata): ``top_n``, the
grid, the word list's sha256 and size. The word list is looked for, by that hash, at the
path given, ``$SEA_WORDLIST`` and the package's ``wordlist/data/``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import shards
from wordlist import DATA_DIR, WordList, WordListError, load_wordlist, sha256_file


def find_wordlist(meta: dict, given: str | os.PathLike | None = None,
                  run_dir: str | os.PathLike | None = None) -> WordList:
    """The word list a run was made with, found by the sha256 in its metadata: ``given``, the
    copy in the run's own folder (``wordlist.txt``, written for any list but 2of12),
    ``$SEA_WORDLIST``, the package's ``wordlist/data/``."""
    want = meta["wordlist_sha256"]
    if given:  # named on purpose: it must be the one
        got = sha256_file(given) if Path(given).is_file() else "missing"
        if got != want:
            raise WordListError(f"--wordlist {given}: sha256 {got}, the run was made with a list "
                                f"of sha256 {want} ({meta['wordlist_size']} words)")
    candidates = [Path(given)] if given else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / "wordlist.txt")
    if os.environ.get("SEA_WORDLIST"):
        candidates.append(Path(os.environ["SEA_WORDLIST"]))
    candidates += sorted(DATA_DIR.glob("*.txt"))
    for c in candidates:
        if c.is_file() and sha256_file(c) == want:
            wl = load_wordlist(c, expect_sha256=want)
            if len(wl) != meta["wordlist_size"]:
                raise WordListError(f"{c}: {len(wl)} words, the run has {meta['wordlist_size']}")
            return wl
    looked = ", ".join(str(c) for c in candidates)
    raise WordListError(f"no word list with sha256 {want} ({meta['wordlist_size']} words) in: "
                        f"{looked}. Pass the file the run was made with (--wordlist PATH, the "
                        f"run's labels.wordlist)")


@dataclass
class ImageLabels:
    image_id: str
    path: str
    grid: tuple[int, int]
    ids: np.ndarray  # (P, n) uint16, SENTINEL where nothing was kept
    scores: np.ndarray  # (P, n) float32
    words: tuple[str, ...]

    def patch(self, row: int, col: int) -> list[tuple[str, float]]:
        """A patch's kept labels and scores, best first."""
        gh, gw = self.grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise IndexError(f"patch {row},{col} is outside the {gh}x{gw} grid")
        p = row * gw + col
        return [(self.words[int(i)], float(s)) for i, s in zip(self.ids[p], self.scores[p], strict=True)
                if i != shards.SENTINEL]

    def top1_grid(self, empty: str = "-") -> list[list[str]]:
        gh, gw = self.grid
        top = [self.words[int(i)] if i != shards.SENTINEL else empty for i in self.ids[:, 0]]
        return [top[r * gw:(r + 1) * gw] for r in range(gh)]


class LabelSet:
    """A finished label run, opened for reading (verified against its manifest)."""

    def __init__(self, shard_dir: str | os.PathLike, wordlist: str | os.PathLike | None = None,
                 verify: bool = True):
        self.dir = Path(shard_dir)
        self.meta, self.paths = shards.open_label_set(self.dir, verify=verify)
        self.wordlist = find_wordlist(self.meta, wordlist, self.dir)
        self.top_n = self.meta["top_n"]

    def image_root(self, override: str | os.PathLike | None = None) -> Path:
        """Where the run's images are: ``override``, else the run's ``input.image_root``."""
        if override:
            return Path(override)
        return Path(json.loads((self.dir / "run.json").read_text())["image_root"])

    @property
    def crop(self) -> dict:
        """The encoder transform's geometry (``crop`` in the metadata); runs made before it
        was recorded get open_clip's default, a shortest-side resize and a centre crop."""
        s = self.meta["image_size"]
        return self.meta.get("crop") or {"resize": s[0], "center_crop": list(s),
                                         "interpolation": "bicubic"}

    def batches(self, batch_size: int = 256):
        """(record batch, ids (B, P, n), scores (B, P, n)), shard by shard: bounded memory."""
        for p in self.paths:
            for rb in shards.iter_shard(p, batch_size=batch_size):
                _, ids, scores = shards.batch_arrays(rb, self.top_n)
                yield rb, ids, scores

    def image(self, key: str) -> ImageLabels:
        """One image's labels, by its path relative to the image root or its id."""
        from pipeline.data import normalize_path

        norm = normalize_path(key)
        for rb, ids, scores in self.batches():
            paths = [normalize_path(x) for x in rb.column("path").to_pylist()]
            image_ids = rb.column("image_id").to_pylist()
            for i, (path, iid) in enumerate(zip(paths, image_ids, strict=True)):
                if path == norm or iid == key:
                    grid = (int(rb.column("grid_h")[i].as_py()), int(rb.column("grid_w")[i].as_py()))
                    return ImageLabels(iid, path, grid, ids[i], scores[i], self.wordlist.words)
        raise KeyError(f"{key}: no image with that path or id in {self.dir}")


# --- statistics (the paper's Figure 6) -------------------------------------------------------

SCORE_BINS = np.linspace(-1.0, 1.0, 401)  # cosines (sea, vanilla) lie in [-1, 1]


def score_bins(ls: LabelSet) -> np.ndarray:
    """400 bins over the run's score range: [-1, 1] for cosines; for ``surgery`` (whose scores
    are weighted cosines minus their mean, 2.1 seen on real runs) over the scores' own min and
    max, found by a first pass over the scores column."""
    if ls.meta.get("mode") in ("sea", "vanilla"):
        return SCORE_BINS
    lo, hi = np.inf, -np.inf
    for _, ids, scores in ls.batches():
        s = scores[ids != shards.SENTINEL]
        if s.size:
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    if not np.isfinite(lo):
        return SCORE_BINS
    pad = max(1e-6, 1e-3 * (hi - lo))
    return np.linspace(min(lo, -1.0) - pad, max(hi, 1.0) + pad, 401)


def statistics(ls: LabelSet, top_words: int = 30) -> dict:
    """Streamed over the row groups, memory independent of the run's size: score
    histograms (all kept labels, top-1) over the run's whole score range (what falls outside
    is counted in ``clipped``), kept labels per patch, word usage, errors."""
    n = ls.top_n
    bins = score_bins(ls)
    clipped = {"below": 0, "above": 0}
    usage = np.zeros(len(ls.wordlist), dtype=np.int64)
    top1_usage = np.zeros(len(ls.wordlist), dtype=np.int64)
    kept_hist = np.zeros(n + 1, dtype=np.int64)
    h_all = np.zeros(len(bins) - 1, dtype=np.int64)
    h_top = np.zeros_like(h_all)
    images = patches = 0
    lo, hi, total = np.inf, -np.inf, 0.0
    for _, ids, scores in ls.batches():
        kept = ids != shards.SENTINEL
        images += ids.shape[0]
        patches += ids.shape[0] * ids.shape[1]
        kept_hist += np.bincount(kept.sum(-1).ravel(), minlength=n + 1)
        usage += np.bincount(ids[kept].astype(np.int64), minlength=len(usage))
        first = kept[..., 0]
        top1_usage += np.bincount(ids[..., 0][first].astype(np.int64), minlength=len(usage))
        s = scores[kept]
        if s.size:
            lo, hi, total = min(lo, float(s.min())), max(hi, float(s.max())), total + float(s.sum(dtype=np.float64))
        clipped["below"] += int((s < bins[0]).sum())
        clipped["above"] += int((s > bins[-1]).sum())
        h_all += np.histogram(np.clip(s, bins[0], bins[-1]), bins)[0]
        h_top += np.histogram(np.clip(scores[..., 0][first], bins[0], bins[-1]), bins)[0]
    labels = int(usage.sum())
    order = np.argsort(-usage, kind="stable")[:top_words]
    errors = Counter()
    err_file = ls.dir / "errors.jsonl"
    if err_file.is_file():
        from pipeline.extract import reason_kind

        with open(err_file) as f:
            for line in f:
                if line.strip():
                    errors[reason_kind(json.loads(line)["reason"])] += 1
    return {
        "run": str(ls.dir), "mode": ls.meta.get("mode"), "images": images, "patches": patches,
        "top_n": n, "labels": labels, "labels_per_patch": labels / max(1, patches),
        "kept_per_patch_histogram": kept_hist.tolist(),
        "patches_without_label": int(kept_hist[0]),
        "wordlist_size": len(ls.wordlist),
        "words_used": int((usage > 0).sum()),
        "share_of_wordlist_used": float((usage > 0).mean()),
        "words_used_as_top1": int((top1_usage > 0).sum()),
        "top_words": [{"word": ls.wordlist.words[i], "count": int(usage[i]),
                       "share_of_labels": float(usage[i]) / max(1, labels)} for i in order if usage[i]],
        "score": {"min": lo if labels else None, "max": hi if labels else None,
                  "mean": total / labels if labels else None,
                  "bins": bins.tolist(), "all_kept": h_all.tolist(), "top1": h_top.tolist(),
                  "clipped": clipped},
        "errors_by_reason": dict(errors.most_common()),
    }


def plot_statistics(st: dict, out_dir: str | os.PathLike) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    bins = np.array(st["score"]["bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    nz = [i for i, (a, b) in enumerate(zip(st["score"]["all_kept"], st["score"]["top1"], strict=True)) if a or b]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if nz:
        sl = slice(max(0, nz[0] - 2), nz[-1] + 3)
        for key, label in (("all_kept", "all kept labels"), ("top1", "top-1 label")):
            h = np.array(st["score"][key], dtype=float)
            ax.plot(centres[sl], h[sl] / max(1.0, h.sum()), label=label)
    cl = st["score"].get("clipped", {})
    note = (f"; {cl['below']} below / {cl['above']} above the range counted at its ends"
            if cl.get("below") or cl.get("above") else "; nothing outside the range")
    ax.set_xlabel(f"score ({st['mode']} mode), range [{bins[0]:.2f}, {bins[-1]:.2f}]{note}", fontsize=8)
    ax.set_ylabel("share of labels")
    ax.legend()
    ax.set_title("Distribution of kept scores")
    fig.tight_layout()
    paths.append(out / "scores.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(range(st["top_n"] + 1), st["kept_per_patch_histogram"])
    axes[0].set_xlabel("kept labels per patch")
    axes[0].set_ylabel("patches")
    words = st["top_words"][:20]
    axes[1].barh([w["word"] for w in words][::-1], [w["share_of_labels"] for w in words][::-1])
    axes[1].set_xlabel("share of all labels")
    axes[1].set_title(f"{st['words_used']} of {st['wordlist_size']} words used "
                      f"({st['share_of_wordlist_used']:.1%})")
    fig.tight_layout()
    paths.append(out / "labels.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
