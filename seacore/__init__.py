"""Helpers both halves use: typed configs (``seacore.config``), the command-line habits built on
them (``seacore.cli``) and device selection (``seacore.device``). The lowest layer: it imports
nothing of ``wordlist``, ``pipeline`` or ``trainer``, and nothing heavy at import time."""
