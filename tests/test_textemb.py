import numpy as np
import torch
import torch.nn.functional as F

from pipeline.encoders import load_encoder
from pipeline.textemb import encode_words, load_or_encode
from wordlist import load_wordlist

WORDS = ["a", "aardvark", "able-bodied", "ain't", "I'd", "zucchini", "antidisestablishmentarianism"]


def test_truncated_context_equals_full_77_tokens(tiny_clip):
    enc = load_encoder(tiny_clip)
    ours = encode_words(enc.model, enc.tokenizer, WORDS, progress=False)
    with torch.no_grad():
        full = F.normalize(enc.model.encode_text(enc.tokenizer(WORDS)), dim=-1).numpy()
    np.testing.assert_allclose(ours, full, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_template_ensemble_is_mean_of_normalised(tiny_clip):
    enc = load_encoder(tiny_clip)
    tpls = ["a photo of a {}.", "a {} in a picture"]
    ens = encode_words(enc.model, enc.tokenizer, WORDS, tpls, progress=False)
    parts = [encode_words(enc.model, enc.tokenizer, WORDS, [t], progress=False) for t in tpls]
    want = sum(parts)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(ens, want, atol=1e-5)
    assert not np.allclose(parts[0], parts[1], atol=1e-3)


def test_cache_hit_on_second_run(tiny_clip, tmp_path):
    enc = load_encoder(tiny_clip)
    wl = load_wordlist()
    first, path, hit = load_or_encode(enc, wl, [], tmp_path, progress=False)
    assert not hit and first.shape == (len(wl), 32)
    again, path2, hit2 = load_or_encode(enc, wl, [], tmp_path, progress=False)
    assert hit2 and path2 == path
    np.testing.assert_array_equal(first, again)
    # another template set is another key
    _, path3, hit3 = load_or_encode(enc, type(wl)(wl.words[:50], "x" * 64, "t"), ["a {}"],
                                    tmp_path, progress=False)
    assert not hit3 and path3 != path
