"""Typed configs: dataclasses loaded from YAML and overridden by ``key.sub=value`` arguments.

Every field carries a docstring-like comment in its dataclass; ``describe(cls)`` prints them.
Unknown keys are an error naming the key, so a typo never silently falls back to a default.
The trainer reuses ``load_config`` with its own dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, with errors that name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        bad = isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
        try:
            if not bad:
                return int(value)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            raise ConfigError(f"{key}: expected a string, got null")
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    return value


def doc(default: Any, text: str):
    """A dataclass field with a default and a one-line description (shown by describe())."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known at this level: {', '.join(types_)})"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        # YAML parsing lets `n=10`, `flag=true`, `templates=[a, b]` mean what they look like.
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e.problem})") from None
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults, then the YAML file (if any), then ``key.sub=value`` overrides."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides)))
    base = to_dict(cls())
    # Merge onto defaults so nested sections given partially keep their other defaults.
    return from_dict(cls, _merge(base, data))


def config_hash(obj_or_dict) -> str:
    d = obj_or_dict if isinstance(obj_or_dict, dict) else to_dict(obj_or_dict)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def describe(cls, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default. Used by ``--help-config``."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_dataclass_type(tp):
            lines += describe(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            doc = f.metadata.get("doc", "")
            lines.append(f"{prefix}{f.name} = {default!r}  # {doc}")
    return lines


# --- the extraction stage's config ----------------------------------------------------------


@dataclasses.dataclass
class InputConfig:
    json: str | None = doc(None, "LLaVA-format JSON (list of {id, image, conversations}); "
                                 "null walks image_root instead")
    image_root: str = doc("data/images", "folder the JSON's image paths are relative to")
    limit: int | None = doc(None, "only the first N images (smoke runs)")
    max_pixels: int = doc(89_478_485, "images larger than this are refused as decompression bombs")


@dataclasses.dataclass
class EncoderConfig:
    model: str = doc("ViT-L-14-336", "open_clip model name, or local-dir:/path, or hf-hub:org/repo")
    pretrained: str | None = doc("openai", "pretrained tag (looked up in the HF cache) or a "
                                           "checkpoint file path")
    allow_download: bool = doc(False, "let open_clip download missing weights")
    cache_dir: str | None = doc(None, "Hugging Face cache dir for weights (default: HF_HOME)")


@dataclasses.dataclass
class LabelConfig:
    mode: str = doc("sea", "sea (raw tokens, -cos, the paper) | vanilla (+cos) | surgery")
    top_n: int = doc(10, "labels kept per patch")
    min_score: float = doc(0.0, "scores below this are dropped (paper: 0)")
    templates: list[str] = doc([], "prompt templates; [] = the bare word; several = ensemble")
    surgery_depth: int = doc(6, "blocks with the CLIP Surgery second path (reference code: 6)")
    surgery_weights: str = doc("token", "feature-surgery word weights: token (each patch's own "
                                        "similarities, current CLIP Surgery code) | cls (the "
                                        "class token's, older copies)")
    search_backend: str = doc("auto", "auto | faiss | torch")
    text_batch_size: int = doc(1024, "words per text-tower batch")
    text_cache_dir: str | None = doc(None, "word-embedding cache (default $SEA_CACHE or ~/.cache/sea)")
    wordlist: str | None = doc(None, "word list file; null = the hash-checked 2of12 list")


@dataclasses.dataclass
class RunConfig:
    output: str = doc("shards/default", "run directory for shards, manifest and errors")
    chunk_size: int = doc(5000, "images per shard; fixed per run (part of the run identity)")
    batch_size: int = doc(32, "images per vision-tower batch")
    decode_workers: int = doc(2, "decode threads (local runner) or CPU tasks in flight per actor")
    device: str = doc("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    row_group_size: int = doc(256, "rows per Parquet row group (bounds writer memory)")
    overwrite: bool = doc(False, "replace a run made with another config in the same output")
    max_error_rate: float = doc(0.05, "largest share of failed images (missing, corrupt) a "
                                      "run may have and still exit 0; the shards are written either way")
    runner: str = doc("ray", "ray (local Ray sized to the machine, or ray.address) | local (in-process, no Ray)")
    progress: bool = doc(True, "progress bars")


@dataclasses.dataclass
class RayConfig:
    address: str | None = doc(None, "Ray cluster address (or $RAY_ADDRESS); null starts a new "
                                    "local Ray, never joining one found on the machine")
    connect_timeout_s: float = doc(30.0, "seconds to reach ray.address before giving up")
    num_actors: int | None = doc(None, "model actors; null = GPUs, or 1 on a CPU machine")
    cpus_per_actor: float = doc(1.0, "CPUs reserved by each model actor (Ray scheduling)")
    decode_cpus: float = doc(1.0, "CPUs per decode task")
    max_tasks_in_flight: int = doc(4, "decode batches queued per actor (backpressure)")
    max_task_retries: int = doc(3, "Ray retries of a failed task or restarted actor")
    torch_threads: int | None = doc(None, "torch threads per model actor (null: the node's cores "
                                          "on CPU, cpus_per_actor next to a GPU)")


@dataclasses.dataclass
class ExtractConfig:
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def validate(self) -> None:
        if self.labels.top_n < 1:
            raise ConfigError("labels.top_n must be >= 1")
        if self.run.chunk_size < 1 or self.run.batch_size < 1:
            raise ConfigError("run.chunk_size and run.batch_size must be >= 1")
        if not 0.0 <= self.run.max_error_rate <= 1.0:
            raise ConfigError(f"run.max_error_rate must be in [0, 1], got {self.run.max_error_rate}")
        if self.run.runner not in ("local", "ray"):
            raise ConfigError(f"run.runner must be local or ray, got '{self.run.runner}'")
        if self.labels.surgery_weights not in ("token", "cls"):
            raise ConfigError(f"labels.surgery_weights must be token or cls, "
                              f"got '{self.labels.surgery_weights}'")
        if self.labels.search_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"labels.search_backend must be auto, faiss or torch, "
                              f"got '{self.labels.search_backend}'")
