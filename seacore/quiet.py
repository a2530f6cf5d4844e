"""Quiet by default: what third-party libraries print that says nothing to our users, silenced
only around the calls that print it (never globally at import)."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def no_loading_bars():
    """transformers 5's "Loading weights" progress bar of every ``from_pretrained``: a second
    of noise per load of a local model."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:
        yield
        return
    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def building_random_model():
    """open_clip warns on the root logger that a model it builds is randomly initialised: true,
    and what we want, when we build one to train or to save (tiny test models, the world's CLIP)."""
    f = _DropRandomInit()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)
