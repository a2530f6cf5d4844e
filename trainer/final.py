"""A run's ``final/`` folder: written by ``write_final`` at the end of training, read by
``load_final`` (generate, report, export) and by stage 2's ``init_from`` (``init_adapter``).

``final/`` holds ``adapter.safetensors`` (adapter, and the temperature when SEA trained one),
``sea_model.json`` (which vision tower, weights hash, feature layer, LLM), the trained LLM
for stage 2 (``llm/``) and the tuned vision weights when the tower trained.

``init_adapter`` also takes a LLaVA ``mm_projector.bin`` (read with ``weights_only=True``:
loading it can run no code), so a projector pretrained with the LLaVA codebase starts our
stage 2, and it refuses a stage-1 run made for another vision tower, feature layer or LLM,
naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seacore.config import config_hash
from trainer import distributed as D

LLAVA_PROJECTOR_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")


def _full(v: torch.Tensor) -> torch.Tensor:
    """A parameter whole (collective for a DTensor: every rank calls it, in the same order)."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _gather_to_main(p, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``named`` whole on rank 0's CPU ({} elsewhere), one tensor gathered at a time."""
    out = {}
    for name, v in named:
        t = _full(v.detach())
        if p.dist.is_main():
            out[name] = t.cpu().contiguous()
        del t
    return out


def save_llm_streamed(p, out: Path, max_file_bytes: int = 2 << 30) -> None:
    """The (trained) LLM as a Hugging Face folder of safetensors files of at most
    ``max_file_bytes``, gathered file by file: rank 0 holds one file's tensors at a time, never
    the whole model (13B in fp32 is 52 GB). Names and layout are ``save_pretrained``'s."""
    from safetensors.torch import save_file

    llm = p.task.mllm.llm
    state = llm.state_dict()  # sharded under FSDP: DTensors, nothing gathered yet
    names = {n for n, _ in llm.named_parameters()} | {n for n, _ in llm.named_buffers()}
    keys = [k for k in state if k in names]  # a tied head appears once, as save_pretrained writes
    files, size = [[]], 0
    for k in keys:
        n = state[k].numel() * state[k].element_size()
        if files[-1] and size + n > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(k)
        size += n
    if p.dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(files, 1):
        name = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
        tensors = _gather_to_main(p, [(k, state[k]) for k in group])
        if p.dist.is_main():
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, name))
        del tensors
    if p.dist.is_main():
        if len(files) > 1:
            total = sum(state[k].numel() * state[k].element_size() for k in keys)
            (out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        llm.config.save_pretrained(out)
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.save_pretrained(out)
        p.tokenizer.save_pretrained(out)


def write_final(p, out: Path) -> None:
    """What inference needs: adapter (+ temperature), the LLM (stage 2: the trained one;
    stage 1: a reference to the frozen one), the vision tower's reference and the config.
    Collective under torchrun; no rank gathers more than the adapter and one LLM file."""
    from safetensors.torch import save_file

    from trainer.llm import llm_identity

    task = p.task
    small = [(f"mllm.{k}", v) for k, v in task.mllm.adapter.state_dict(prefix="adapter.").items()]
    if task.align is not None and task.align.log_tau.requires_grad:
        small.append(("align.log_tau", task.align.log_tau))
    if task.train_vision:
        small += [(f"mllm.vision.visual.{k}", v) for k, v in task.mllm.vision.visual.state_dict().items()]
    full = _gather_to_main(p, small)
    llm_ref = p.cfg.llm.path
    if p.stage == "finetune":
        save_llm_streamed(p, out / "llm")
        llm_ref = "llm"
    if not p.dist.is_main():
        D.barrier(p.dist)
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k[len("mllm."):]: v for k, v in full.items() if k.startswith("mllm.adapter.")}
    if "align.log_tau" in full:
        tensors["log_tau"] = full["align.log_tau"].reshape(1)
    save_file(tensors, str(out / "adapter.safetensors"))
    if p.task.train_vision:
        vis = {k[len("mllm.vision.visual."):]: v for k, v in full.items()
               if k.startswith("mllm.vision.visual.")}
        save_file(vis, str(out / "vision.safetensors"))
    enc = p.encoder
    (out / "sea_model.json").write_text(json.dumps({
        "stage": p.stage, "llm": llm_ref,
        "llm_identity": llm_identity(p.cfg.llm.path, p.task.mllm.llm),
        "vision": {"model": p.cfg.vision.model, "pretrained": p.cfg.vision.pretrained,
                   "encoder": enc.name, "s2_scales": list(p.cfg.vision.s2_scales),
                   "weights_sha256": enc.weights_sha256, "feature_layer": p.cfg.vision.feature_layer,
                   "image_size": list(enc.image_size), "grid": list(enc.grid),
                   "tuned_weights": "vision.safetensors" if p.task.train_vision else None},
        "adapter": "mlp2x_gelu", "max_length": p.cfg.data.max_length,
        "label_tokenization": p.cfg.sea.label_tokenization,  # how Eq. 8 tokenized the words
        "chat_template": p.cfg.llm.chat_template,  # vicuna_v1: installed on the tokenizer
        "config_hash": config_hash(p.cfg)}, indent=2))
    D.barrier(p.dist)


def final_dir(path: str | Path) -> Path:
    """A run dir or its ``final/`` -> the folder holding ``sea_model.json``."""
    path = Path(path)
    if not (path / "sea_model.json").is_file() and (path / "final" / "sea_model.json").is_file():
        path = path / "final"
    if not (path / "sea_model.json").is_file():
        raise FileNotFoundError(f"{path} holds no sea_model.json (a training run's final/ folder)")
    return path


def load_final(path: str | Path, device: str | torch.device = "cpu"):
    """-> (mllm, tokenizer, preprocess, meta). ``path``: a run dir or its ``final/``."""
    from safetensors.torch import load_file

    from pipeline.encoders import load_encoder
    from trainer.llm import load_llm
    from trainer.model import MLLM

    path = final_dir(path)
    meta = json.loads((path / "sea_model.json").read_text())
    v = meta["vision"]
    device = torch.device(device)
    enc = load_encoder(v["model"], v["pretrained"], device=device, section="vision")
    if v.get("weights_sha256") and enc.weights_sha256 != v["weights_sha256"]:
        raise ValueError(f"vision weights {enc.weights_sha256} differ from the trained model's "
                         f"{v['weights_sha256']}")
    if v.get("tuned_weights"):
        enc.model.visual.load_state_dict(load_file(str(path / v["tuned_weights"])))
    llm_path = str(path / meta["llm"]) if (path / meta["llm"]).is_dir() else meta["llm"]
    tok, llm = load_llm(llm_path, "auto", device)
    if meta.get("chat_template") == "vicuna_v1":  # stage 1's final/ names the original LLM
        from trainer.prompts import VICUNA_V1

        tok.chat_template = VICUNA_V1
    scales = v.get("s2_scales") or []
    mllm = MLLM(enc.model.visual, llm, v["feature_layer"], scales).to(device)
    mllm.adapter.load_state_dict(read_adapter(path / "adapter.safetensors")[0])
    mllm.eval().requires_grad_(False)
    from trainer.s2 import tower_transform

    return mllm, tok, tower_transform(enc.preprocess, scales), meta


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``adapter.safetensors`` (written by ``write_final``) -> (adapter state, log tau or None)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = {k[len("adapter."):]: t for k, t in tensors.items() if k.startswith("adapter.")}
    return state, tensors.get("log_tau")


def read_llava_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """A LLaVA ``mm_projector.bin`` (keys ``model.mm_projector.{0,2}.{weight,bias}``, any
    prefix) -> our adapter's state. Unpickled with ``weights_only=True``: tensors only."""
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError (code in it), or not a torch file at all
        raise ValueError(f"init_from: {path} is not a tensors-only torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); give a LLaVA mm_projector.bin or our "
                         f"adapter.safetensors") from None
    if not isinstance(raw, dict):
        raise ValueError(f"init_from: {path} holds a {type(raw).__name__}, not a state dict")
    state = {}
    for k, t in raw.items():
        head, sep, tail = k.partition("mm_projector.")
        if sep and tail in LLAVA_PROJECTOR_KEYS:
            if tail in state:
                raise ValueError(f"init_from: {path} holds two projectors ({k})")
            state[tail] = t.float()
    if set(state) != set(LLAVA_PROJECTOR_KEYS):
        raise ValueError(f"init_from: {path} is not a LLaVA mlp2x_gelu projector: expected keys "
                         f"'model.mm_projector.{{0,2}}.{{weight,bias}}', found {sorted(raw)[:6]}")
    return state


def _check_llava_config(folder: Path, feature_layer: int) -> None:
    """LLaVA writes config.json beside mm_projector.bin: the projector type and select layer
    there must be ours."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    kind = cfg.get("mm_projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise ValueError(f"init_from: {cfg_path} says mm_projector_type={kind}; only mlp2x_gelu "
                         f"(LLaVA-1.5's) is supported")
    layer = cfg.get("mm_vision_select_layer")
    if layer is not None and layer != feature_layer:
        raise ValueError(f"init_from: {cfg_path} was trained on mm_vision_select_layer={layer}, "
                         f"this run has vision.feature_layer={feature_layer}")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ValueError(f"init_from: {cfg_path} has mm_vision_select_feature={feature}; our "
                         f"adapter sees patch tokens only ('patch')")


def check_stage1(meta: dict, where: Path, cfg, encoder, llm) -> None:
    """Refuse a stage-1 run made for another vision tower, feature layer or LLM, naming the
    field (the adapter maps one tower's layer into one LLM's embedding space)."""
    from trainer.llm import llm_identity

    v = meta.get("vision", {})
    problems = []
    was, now_sha = v.get("weights_sha256"), encoder.weights_sha256
    if was and now_sha and was != now_sha:
        problems.append(f"vision weights: stage 1 used sha256 {was[:12]}..., this "
                        f"run's vision.model/vision.pretrained give {now_sha[:12]}...")
    elif bool(was) != bool(now_sha):  # one side unhashed: the weights cannot be shown equal
        problems.append(
            "vision weights: " + (f"stage 1 used sha256 {was[:12]}..., this run's tower has no "
                                  f"weights file to hash (random weights, or an hf-hub: model)"
                                  if was else
                                  f"stage 1 recorded no weights hash (random weights, or an hf-hub: "
                                  f"model), this run's tower has sha256 {now_sha[:12]}...")
            + "; use the same vision.model and vision.pretrained as stage 1")
    stage1_name = v.get("encoder") or v.get("model")
    if stage1_name and stage1_name not in (encoder.name, cfg.vision.model):
        problems.append(f"vision.model: stage 1 used '{v.get('model')}', this run has "
                        f"'{cfg.vision.model}'")
    if list(v.get("s2_scales") or []) != list(cfg.vision.s2_scales):
        problems.append(f"vision.s2_scales: stage 1 used {v.get('s2_scales') or []}, this run has "
                        f"{list(cfg.vision.s2_scales)}")
    if v.get("feature_layer") is not None and v["feature_layer"] != cfg.vision.feature_layer:
        problems.append(f"vision.feature_layer: stage 1 used {v['feature_layer']}, this run has "
                        f"{cfg.vision.feature_layer}")
    then = meta.get("llm_identity") or {"name": Path(str(meta.get("llm", ""))).name}
    now = llm_identity(cfg.llm.path, llm)
    for k, was in then.items():
        if was is not None and now.get(k) != was:
            problems.append(f"llm.path: stage 1's LLM has {k}={was!r}, this run's "
                            f"({cfg.llm.path}) has {now.get(k)!r}")
    if problems:
        raise ValueError(f"init_from={where} does not fit this run: " + "; ".join(problems))


def init_adapter(task, init_from: str | Path, cfg, encoder) -> str:
    """Start stage 2's adapter (and temperature) from a stage-1 run of ours (dir, final/ or
    adapter.safetensors: checked against this run's config) or a LLaVA ``mm_projector.bin``.
    Returns what was loaded, for the log."""
    path = Path(init_from)
    found = None
    for cand in (path, path / "adapter.safetensors", path / "final" / "adapter.safetensors",
                 path / "mm_projector.bin"):
        if cand.is_file():
            found = cand
            break
    if found is None:
        raise FileNotFoundError(f"init_from: nothing at {init_from} (give a stage-1 run dir, its "
                                f"final/ folder, its adapter.safetensors, or a LLaVA "
                                f"mm_projector.bin)")
    log_tau = None
    if found.suffix == ".safetensors":
        if (found.parent / "sea_model.json").is_file():
            meta = json.loads((found.parent / "sea_model.json").read_text())
            check_stage1(meta, found.parent, cfg, encoder, task.mllm.llm)
        state, log_tau = read_adapter(found)
        kind = "sea adapter"
    elif found.suffix in (".bin", ".pt", ".pth"):
        _check_llava_config(found.parent, cfg.vision.feature_layer)
        state = read_llava_projector(found)
        kind = "LLaVA mm_projector"
    else:
        raise ValueError(f"init_from: {found} is neither adapter.safetensors nor a LLaVA "
                         f"mm_projector.bin")
    want = {k: tuple(t.shape) for k, t in task.mllm.adapter.state_dict().items()}
    got = {k: tuple(t.shape) for k, t in state.items()}
    if want != got:
        raise ValueError(f"init_from: the {kind} in {found} maps {got.get('0.weight', ('?', '?'))[1]} "
                         f"-> {got.get('2.weight', ('?',))[0]} features, this model needs vision "
                         f"width {want['0.weight'][1]} -> LLM hidden size {want['2.weight'][0]} "
                         f"(check vision.model and llm.path)")
    task.mllm.adapter.load_state_dict(state)
    if task.align is not None and log_tau is not None:
        with torch.no_grad():
            task.align.log_tau.copy_(log_tau.reshape(()))
    return f"{kind} from {found}"
