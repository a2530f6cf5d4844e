"""The ground-truth world: scenes with per-patch truth, models trained in them, and the
measurements (``make evidence``) and the demo (``make demo``) built on both halves of the
project. Sits above ``pipeline`` and ``trainer``; neither imports it."""
