"""Pick the runner named by ``run.runner``: in-process (local) or Ray."""

from __future__ import annotations

from pipeline.config import ExtractConfig


def run(cfg: ExtractConfig) -> dict:
    if cfg.run.runner == "ray":
        from pipeline.ray_runner import run_ray

        return run_ray(cfg)
    from pipeline.extract import run_local

    return run_local(cfg)
