"""Word-list text embeddings: each word through the text tower once, L2-normalised, cached.

Templates: ``[]`` encodes the bare word; one template (``"a photo of a {}."``) formats it;
several are an ensemble whose normalised embeddings are averaged and renormalised (CLIP's
zero-shot recipe). The cache file is keyed by encoder, weights, word list and templates.

Speed: CLIP's text tower is causal and pools at the end-of-text token, so tokens after it
cannot change the pooled feature. We cut each batch's context to its longest word instead of
77 tokens (2of12 words are at most ~10 BPE tokens): the same numbers at a fraction of the
work (``tests/test_textemb.py`` checks equality against open_clip's own ``encode_text``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from seacore.files import atomic_path

CACHE_VERSION = 1


def cache_root() -> Path:
    """Root of the project's caches: $SEA_CACHE, else ~/.cache/sea."""
    return Path(os.environ.get("SEA_CACHE", Path.home() / ".cache" / "sea"))


def default_cache_dir() -> Path:
    return cache_root() / "text"


def cache_key(encoder_identity: dict, wordlist_sha256: str, templates: list[str]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "encoder": encoder_identity,
                       "wordlist": wordlist_sha256, "templates": list(templates)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _can_truncate(model) -> bool:
    import open_clip

    return (isinstance(model, open_clip.CLIP) and model.attn_mask is not None
            and model.text_pool_type == "argmax")


def _encode_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` on the shortest context that holds every EOT token."""
    length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id in CLIP's BPE
    t = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
    return x @ model.text_projection


@torch.inference_mode()
def encode_words(model, tokenizer, words, templates=(), batch_size: int = 1024,
                 device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    templates = list(templates) or ["{}"]
    model = model.to(device)
    truncate = _can_truncate(model)
    chunks = []
    bar = tqdm(total=len(words) * len(templates), desc="encoding word list", unit="text",
               disable=not progress, mininterval=1.0)
    for start in range(0, len(words), batch_size):
        batch = words[start:start + batch_size]
        acc = None
        for tpl in templates:
            tokens = tokenizer([tpl.format(w) for w in batch]).to(device)
            with torch.autocast("cuda", enabled=torch.device(device).type == "cuda"):
                feats = _encode_truncated(model, tokens) if truncate else model.encode_text(tokens)
            feats = F.normalize(feats.float(), dim=-1)
            acc = feats if acc is None else acc + feats
            bar.update(len(batch))
        chunks.append(F.normalize(acc, dim=-1).cpu().numpy())
    bar.close()
    if not chunks:
        raise ValueError("no words to encode")
    return np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)


def load_or_encode(encoder, wordlist, templates=(), cache_dir: str | Path | None = None,
                   batch_size: int = 1024, device="cpu", progress=True):
    """Return (embeddings (W, D) float32, cache file path, cache_hit)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    ident = {k: v for k, v in encoder.identity().items() if k in ("encoder", "weights_tag",
                                                                   "weights_sha256")}
    key = cache_key(ident, wordlist.sha256, list(templates))
    path = cache_dir / f"words-{key}.npy"
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(wordlist):
            return emb, path, True
    emb = encode_words(encoder.model, encoder.tokenizer, list(wordlist.words), templates,
                       batch_size=batch_size, device=device, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    (cache_dir / f"words-{key}.json").write_text(json.dumps(
        {"encoder": ident, "wordlist_sha256": wordlist.sha256, "wordlist_size": len(wordlist),
         "templates": list(templates), "shape": list(emb.shape)}, indent=2))
    return emb, path, False
