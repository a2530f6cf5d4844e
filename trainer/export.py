"""A trained run out to the tools LLaVA users already have (``python -m trainer export``).

``hf-llava``: a folder that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load offline. The open_clip tower becomes ``CLIPVisionModel``
weights (``pipeline.hf_clip``), the adapter ``multi_modal_projector`` (``linear_1``, GELU,
``linear_2``: the same mlp2x_gelu), the LLM (stage 2: the trained one; stage 1: the frozen
one, copied) ``language_model`` + ``lm_head``. ``<image>`` is added to the tokenizer; its
embedding row is never read (the processor expands it to one token per patch and the model
puts the visual tokens there), its output row is zero and generation suppresses it. The
processor has the tower's resize/crop and mean/std, ``patch_size``, the ``default`` select
strategy (class token dropped, as we train) and a chat template that renders exactly our
training prompts: the tokenizer's own template, or LLaVA-1.5's v1 fallback for tokenizers
without one (Vicuna); stage-1 models get ``<image>`` alone (they caption).

``llava``: the LLaVA repository's layout. ``mm_projector.bin`` (keys
``model.mm_projector.{0,2}.{weight,bias}``, for ``--pretrain_mm_mlp_adapter``) and a
``config.json`` with LLaVA's fields (``mm_projector_type: mlp2x_gelu``,
``mm_vision_select_layer``, ``mm_hidden_size``, ``mm_vision_tower``); stage 2 adds the LLM
weights with the projector inside and the tokenizer. The tower is written to
``vision_tower/`` (``CLIPVisionModel`` + ``CLIPImageProcessor``) and ``mm_vision_tower`` points
at it, or names the transformers id when the run used ``hf-clip:<id>`` untuned.

Towers ``CLIPVisionModel`` cannot hold (open_clip's SigLIP, a timm trunk with an
attention-pool head) are refused with the reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

IMAGE = "<image>"


def export(run: str | Path, fmt: str, out: str | Path) -> dict:
    from trainer.final import load_final

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds files; give an empty or new folder")
    if fmt not in ("hf-llava", "llava"):
        raise ValueError(f"--format must be hf-llava or llava, got {fmt}")
    mllm, tok, preprocess, meta = load_final(run, "cpu")
    if fmt == "hf-llava" and meta["vision"].get("s2_scales"):
        raise ValueError("an S2-Wrapper tower cannot be exported as hf-llava: transformers' LLaVA "
                         "has no multi-scale vision tower; use --format llava (the LLaVA "
                         "repository's s2 settings) or our generate")
    from pipeline.hf_clip import open_clip_visual_to_hf

    vcfg, vsd = open_clip_visual_to_hf(mllm.vision.visual)  # refuses SigLIP before writing
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf-llava":
        return export_hf_llava(mllm, tok, preprocess, meta, vcfg, vsd, out)
    return export_llava(mllm, tok, preprocess, meta, vcfg, vsd, out)


# --- the image processor --------------------------------------------------------------------


# torchvision's interpolation names -> PIL's resampling codes, which CLIPImageProcessor takes
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def image_processor(preprocess):
    """``CLIPImageProcessor`` doing what our transform does: shortest-side resize, centre
    crop, mean/std."""
    from torchvision import transforms as T
    from transformers import CLIPImageProcessor

    from pipeline.encoders import preprocess_geometry

    geo = preprocess_geometry(preprocess)
    norm = next((t for t in getattr(preprocess, "transforms", []) if isinstance(t, T.Normalize)), None)
    if not isinstance(geo["resize"], int) or geo["center_crop"] is None or norm is None:
        raise ValueError(f"the tower's transform ({geo}) is not a shortest-side resize, centre crop "
                         f"and normalisation, which CLIPImageProcessor does")
    resample = PIL_RESAMPLE.get(geo["interpolation"])
    if resample is None:
        raise ValueError(f"the tower's transform resizes with {geo['interpolation']!r}, which "
                         f"CLIPImageProcessor (PIL) cannot do; export a tower whose transform uses "
                         f"one of {sorted(PIL_RESAMPLE)}")
    h, w = geo["center_crop"]
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": geo["resize"]}, resample=resample,
        do_center_crop=True, crop_size={"height": h, "width": w}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(map(float, norm.mean)),
        image_std=list(map(float, norm.std)), do_convert_rgb=True)


# --- the chat template ----------------------------------------------------------------------

# HF processors pass content as a list of {"type": "image"} / {"type": "text"} parts; this
# turns each message back into the string our training rendered: images first, as LLaVA's
# "<image>\n" + text.
_FLATTEN = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set parts = namespace(img='', txt='') -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set parts.img = parts.img + '<image>\\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set parts.txt = parts.txt + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.img + parts.txt -%}{%- endif -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}{%- set messages = ns.msgs -%}"
)


def chat_template(tok, stage: str) -> str:
    """The processor's template: our training prompt, BOS included when the tokenizer does
    not add one itself (``_with_bos``)."""
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if stage == "pretrain":  # LLaVA's plain format: <s><image>, then the caption
        body = ("{%- for m in messages -%}{%- if m['content'] is not string -%}"
                "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}<image>{%- endif -%}"
                "{%- endfor -%}{%- endif -%}{%- endfor -%}")
        return ("" if adds_bos or tok.bos_token is None else "{{ bos_token }}") + body
    if not tok.chat_template:  # load_final installed the run's choice; none: never guess
        from trainer.prompts import no_template

        raise ValueError(no_template(str(tok.name_or_path)))
    body = tok.chat_template
    bos = "" if adds_bos or tok.bos_token is None or "bos_token" in body else "{{ bos_token }}"
    return _FLATTEN + bos + body


def _eos(tok, meta) -> int | list[int] | None:
    """``generation_config.eos_token_id``: every id a reply may end with (EOS and the chat
    template's end of turn), so transformers' own ``generate`` stops where ours does."""
    from trainer.prompts import stop_token_ids

    ids = stop_token_ids(tok, "plain" if meta["stage"] == "pretrain" else "chat")
    return ids if len(ids) > 1 else (ids[0] if ids else None)


def _with_image_token(tok, llm):
    """A copy of the tokenizer with ``<image>``, and the LLM's vocabulary grown to hold it (new
    rows zero: the input row is always replaced, the output row must never win)."""
    from transformers import AddedToken

    tok = copy.deepcopy(tok)
    if IMAGE not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    old = llm.get_input_embeddings().weight.shape[0]
    if image_id >= old:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[old:] = 0
            if llm.get_output_embeddings() is not None and not llm.config.tie_word_embeddings:
                llm.get_output_embeddings().weight[old:] = 0
    return tok, image_id


def export_hf_llava(mllm, tok, preprocess, meta, vcfg, vsd, out: Path) -> dict:
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    llm = mllm.llm  # export's own copy (load_final): grown in place, not copied again (7B: 28 GB)
    tok, image_id = _with_image_token(tok, llm)
    P = mllm.grid[0] * mllm.grid[1]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vcfg), text_config=llm.config,
        image_token_index=image_id, image_seq_length=P, projector_hidden_act="gelu",
        vision_feature_layer=meta["vision"]["feature_layer"],
        vision_feature_select_strategy="default", multimodal_projector_bias=True,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    with torch.device("meta"):  # no random init of a second LLM: every weight is assigned below
        model = LlavaForConditionalGeneration(config).eval()
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "language_model"):
        raise RuntimeError("this transformers has the old LLaVA layout; export needs >= 4.52")
    from pipeline.hf_clip import load_clip_vision

    load_clip_vision(inner.vision_tower, vsd, assign=True)
    a = mllm.adapter
    proj = inner.multi_modal_projector
    proj.linear_1.load_state_dict(a[0].state_dict(), assign=True)
    proj.linear_2.load_state_dict(a[2].state_dict(), assign=True)
    inner.language_model.load_state_dict(llm.get_decoder().state_dict(), assign=True)
    if llm.config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict(), assign=True)
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise RuntimeError(f"export left weights unset: {left[:5]}")
    gen = copy.deepcopy(llm.generation_config)
    gen.suppress_tokens = [image_id]
    gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, _eos(tok, meta)
    gen.bos_token_id = tok.bos_token_id
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    template = chat_template(tok, meta["stage"])
    # the tokenizer gets it too: lmms-eval's llava_hf renders prompts with the tokenizer's
    # template and string content ("<image>\n..."), which the template also takes
    tok.chat_template = template
    processor = LlavaProcessor(
        image_processor=image_processor(preprocess), tokenizer=tok,
        patch_size=vcfg["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template, image_token=IMAGE)
    processor.save_pretrained(out)
    return {"format": "hf-llava", "out": str(out), "stage": meta["stage"],
            "image_token_id": image_id, "image_tokens": P}


def _llava_config(llm, meta: dict, vcfg: dict, tower: str) -> tuple[dict, str | None]:
    """LLaVA's config.json: the LLM's config plus the ``mm_*`` fields its builder reads."""
    arch = {"llama": ("LlavaLlamaForCausalLM", "llava_llama"),
            "mistral": ("LlavaMistralForCausalLM", "llava_mistral")}
    kind = llm.config.model_type
    cfg = llm.config.to_dict()
    note = None
    if kind in arch:
        cfg["architectures"], cfg["model_type"] = [arch[kind][0]], arch[kind][1]
    else:
        note = (f"the LLaVA codebase has no model class for '{kind}' LLMs; mm_projector.bin and "
                f"the mm_* fields are still LLaVA's")
    scales = meta["vision"].get("s2_scales") or []
    if scales:  # LLaVA's CLIPVisionTowerS2 settings
        cfg.update({"s2": True, "s2_scales": ",".join(map(str, scales)),
                    "s2_max_split_size": scales[0]})
    cfg.update({
        "mm_vision_tower": tower, "mm_hidden_size": vcfg["hidden_size"] * max(1, len(scales)),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": meta["vision"]["feature_layer"],
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
        # our training resized and centre-cropped; LLaVA does that when this is not 'pad'
        "image_aspect_ratio": None, "use_mm_proj": True,
        "tune_mm_mlp_adapter": meta["stage"] == "pretrain", "freeze_mm_mlp_adapter": False,
        "tokenizer_model_max_length": meta.get("max_length", 2048),
        "tokenizer_padding_side": "right"})
    return cfg, note


def export_llava(mllm, tok, preprocess, meta, vcfg, vsd, out: Path) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.hf_clip import is_hf_clip, load_clip_vision

    v = meta["vision"]
    if is_hf_clip(v["model"]) and not v.get("tuned_weights") and not Path(
            v["model"][len("hf-clip:"):]).expanduser().is_dir():
        tower = v["model"][len("hf-clip:"):]  # the id LLaVA loads itself
    else:
        vt = CLIPVisionModel(CLIPVisionConfig(**vcfg)).eval()
        load_clip_vision(vt, vsd)
        vt.save_pretrained(out / "vision_tower", safe_serialization=True)
        image_processor(preprocess).save_pretrained(out / "vision_tower")
        tower = str((out / "vision_tower").resolve())
    projector = {f"model.mm_projector.{k}": t.detach().clone().contiguous()
                 for k, t in mllm.adapter.state_dict().items()}
    torch.save(projector, out / "mm_projector.bin")
    if meta["stage"] == "finetune":
        state = {k: t.detach() for k, t in mllm.llm.state_dict().items()}
        state.update(projector)
        mllm.llm.generation_config.eos_token_id = _eos(tok, meta)
        mllm.llm.save_pretrained(out, state_dict=state, safe_serialization=True)
        tok.save_pretrained(out)
    cfg, note = _llava_config(mllm.llm, meta, vcfg, tower)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return {"format": "llava", "out": str(out), "stage": meta["stage"], "mm_vision_tower": tower,
            **({"note": note} if note else {})}
