"""Hugging Face and LLaVA in and out: ``trainer export`` (hf-llava, llava), ``init_from`` with a
LLaVA ``mm_projector.bin``, and stage 2's check of the stage-1 run it starts from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main
from trainer.train import build, train

PROMPT = "What color is the shape?"


def _first_image(sample) -> Path:
    _, root = sample
    return sorted(Path(root).rglob("*.jpg"))[0]


def _expanded(ids: torch.Tensor, image_id: int, n: int) -> list[int]:
    from trainer.model import IMAGE_TOKEN_INDEX

    out = []
    for t in ids.tolist():
        out += [image_id] * n if t == IMAGE_TOKEN_INDEX else [t]
    return out


def _check_hf_export(run, out, sample, capsys, fmt_prompt):
    """The exported model, loaded by transformers alone, against our own generate."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from trainer.final import load_final
    from trainer.generate import answer_ids
    from trainer.prompts import generation_prompt

    assert main(["export", "--run", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    capsys.readouterr()
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    mllm, tok, pre, meta = load_final(run)
    path = _first_image(sample)
    img = Image.open(path).convert("RGB")
    ours_px = pre(img)[None]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=ours_px)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, list | tuple) else feats
        torch.testing.assert_close(feats.reshape(mllm.visual_tokens(ours_px).shape),
                                   mllm.visual_tokens(ours_px), atol=1e-5, rtol=1e-5)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=img, text=text, return_tensors="pt")
    P = mllm.grid[0] * mllm.grid[1]
    image_id = model.config.image_token_id
    fmt = "plain" if meta["stage"] == "pretrain" else "chat"
    assert inputs["input_ids"][0].tolist() == _expanded(
        generation_prompt(tok, PROMPT, fmt, True), image_id, P)
    # the processor's pixels: the same resize/crop/normalisation, within one 8-bit level
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    assert float(((inputs["pixel_values"][0] - ours_px[0]).abs() * std).max()) <= 1 / 255 + 1e-6
    with torch.no_grad():
        gen = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=ours_px, max_new_tokens=10, do_sample=False)
    theirs = gen[0, inputs["input_ids"].shape[1]:].tolist()
    ours = answer_ids(mllm, tok, pre, meta, str(path), PROMPT, max_new_tokens=10)
    assert theirs and theirs == ours
    assert main(["generate", "--checkpoint", str(run), "--image", str(path), "--prompt", PROMPT,
                 "--max-new-tokens", "10", "--device", "cpu"]) == 0
    cli_text = capsys.readouterr().out.strip()
    assert processor.tokenizer.decode(theirs, skip_special_tokens=True).strip() == cli_text


def test_hf_llava_export_answers_as_our_generate(pretrain_cfg, finetune_cfg, sample, tmp_path,
                                                 capsys):
    s1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=2"))
    s2 = train(finetune_cfg(f"init_from={s1['final']}", f"log.output={tmp_path / 's2'}",
                            "optim.max_steps=3"), "finetune")
    _check_hf_export(s2["final"], tmp_path / "hf2", sample, capsys, "chat")
    _check_llava_stage2(s2["final"], tmp_path / "llava2", capsys)
    _check_hf_export(s1["final"], tmp_path / "hf1", sample, capsys, "plain")
    # an export never writes into a folder that holds files
    assert main(["export", "--run", s1["final"], "--format", "hf-llava",
                 "--out", str(tmp_path / "hf1")]) == 2
    assert "already holds files" in capsys.readouterr().err
    # last: skipped where lmms-eval is not installed (it needs its own environment: README)
    _check_lmms_eval(s2["final"], tmp_path / "hf2", sample, capsys)


def test_llava_layout_round_trips_through_init_from(pretrain_cfg, finetune_cfg, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    s1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=2"))
    out = tmp_path / "llava"
    assert main(["export", "--run", s1["final"], "--format", "llava", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["mm_hidden_size"] == 64
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == sorted(f"model.mm_projector.{k}" for k in
                                       ("0.weight", "0.bias", "2.weight", "2.bias"))
    # the tower LLaVA would load from mm_vision_tower gives our penultimate features
    from trainer.final import load_final

    mllm = load_final(s1["final"])[0]
    tower = CLIPVisionModel.from_pretrained(cfg["mm_vision_tower"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hs = tower(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hs[-2][:, 1:], mllm.vision(x), atol=1e-5, rtol=1e-5)
    # LLaVA's projector starts our stage 2
    p = build(finetune_cfg(f"init_from={out / 'mm_projector.bin'}"), "finetune")
    ours = load_file(str(Path(s1["final"]) / "adapter.safetensors"))
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(p.task.mllm.adapter.state_dict()[k], ours[f"adapter.{k}"])
    # LLaVA's config beside it is read: another projector type or select layer is refused
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="mm_projector_type=linear; only mlp2x_gelu"):
        build(finetune_cfg(f"init_from={out / 'mm_projector.bin'}"), "finetune")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_vision_select_layer=-2.*vision.feature_layer=-1"):
        build(finetune_cfg(f"init_from={out / 'mm_projector.bin'}", "vision.feature_layer=-1"),
              "finetune")


def test_init_from_never_runs_pickled_code(finetune_cfg, tmp_path):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": Evil()}, bad)
    with pytest.raises(ValueError, match="not a tensors-only torch file"):
        build(finetune_cfg(f"init_from={bad}"), "finetune")
    assert not marker.exists()
    other = tmp_path / "other.bin"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="not a LLaVA mlp2x_gelu projector"):
        build(finetune_cfg(f"init_from={other}"), "finetune")


def test_stage2_refuses_a_stage1_run_for_another_tower_or_llm(pretrain_cfg, finetune_cfg, workdir,
                                                              sample, tmp_path):
    from pipeline.tiny import save_tiny
    from trainer.tiny import save_tiny_llm

    s1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=1"))
    with pytest.raises(ValueError, match="vision.feature_layer: stage 1 used -2, this run has -1"):
        build(finetune_cfg(f"init_from={s1['final']}", "vision.feature_layer=-1"), "finetune")
    other_clip = save_tiny("clip", workdir / "tiny-clip-seed1", seed=1)
    with pytest.raises(ValueError, match="vision weights: stage 1 used sha256"):
        build(finetune_cfg(f"init_from={s1['final']}", f"vision.model={other_clip}"), "finetune")
    wider = save_tiny_llm(workdir / "tiny-llm-wide", ["red", "cube"], hidden=32, layers=1)
    with pytest.raises(ValueError, match="llm.path: stage 1's LLM has name='tiny-llm'.*"
                                         "|llm.path: stage 1's LLM has hidden_size=64"):
        build(finetune_cfg(f"init_from={s1['final']}", f"llm.path={wider}"), "finetune")


def test_stage2_refuses_a_stage1_run_whose_tower_hash_is_missing(pretrain_cfg, finetune_cfg,
                                                                 tmp_path):
    """Issue 36: a weights hash on one side only used to skip the check (a stage 2 on another
    tower passed); now it is refused, naming the side without one."""
    s1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=1"))
    meta_path = Path(s1["final"]) / "sea_model.json"
    meta = json.loads(meta_path.read_text())
    meta["vision"]["weights_sha256"] = None
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vision weights: stage 1 recorded no weights hash"):
        build(finetune_cfg(f"init_from={s1['final']}"), "finetune")


def test_siglip_tower_export_is_refused_with_the_reason(tiny_siglip, tiny_llm, sample, tmp_path,
                                                        capsys):
    from seacore.config import load_config
    from trainer.config import PretrainConfig

    js, root = sample
    cfg = load_config(PretrainConfig, None, [
        f"vision.model={tiny_siglip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
        f"data.json={js}", f"data.image_root={root}", "data.shards=null", "sea.weight=0",
        "data.num_workers=0", "optim.global_batch_size=2", "optim.micro_batch_size=2",
        "optim.max_steps=1", "log.progress=false", "log.report_to=[]", "log.eval_every=0",
        f"log.output={tmp_path / 'sig'}"])
    run = train(cfg)
    assert main(["export", "--run", run["final"], "--format", "hf-llava",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "CLIPVisionModel holds only CLIP-style ViTs" in err
    assert not (tmp_path / "x").exists()


def _check_lmms_eval(run, out, sample, capsys):
    """lmms-eval's ``llava_hf`` model (what the paper's benchmarks run through) loads the export
    offline and answers as our generate does."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from PIL import Image

    lm = LlavaHf(pretrained=str(out), device="cpu", device_map="cpu", dtype="float32")
    path = _first_image(sample)
    doc = {"image": Image.open(path).convert("RGB")}
    lm.task_dict = {"probe": {"test": {0: doc}}}
    req = Instance("generate_until", (PROMPT, {"max_new_tokens": 10, "temperature": 0},
                                      lambda d: [d["image"]], 0, "probe", "test"), 0,
                   {"task": "probe", "doc_id": 0, "repeats": 1})
    theirs = lm.generate_until([req])[0]
    theirs = theirs.text if hasattr(theirs, "text") else theirs
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--image", str(path), "--prompt", PROMPT,
                 "--max-new-tokens", "10", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out.strip()
    assert ours and theirs.strip() == ours


def _check_llava_stage2(run, out, capsys):
    """The LLaVA layout of a stage-2 run: the trained LLM's weights with the projector inside
    (as LlavaLlamaForCausalLM's state dict has it), and the tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trainer.final import load_final

    assert main(["export", "--run", str(run), "--format", "llava", "--out", str(out)]) == 0
    capsys.readouterr()
    mllm, tok, _, _ = load_final(run)
    saved = load_file(str(out / "model.safetensors"))
    for k, t in mllm.llm.state_dict().items():
        torch.testing.assert_close(saved[k], t)
    for k, t in mllm.adapter.state_dict().items():
        torch.testing.assert_close(saved[f"model.mm_projector.{k}"], t)
    assert json.loads((out / "config.json").read_text())["tune_mm_mlp_adapter"] is False
    assert AutoTokenizer.from_pretrained(out)("a red cube")["input_ids"] == tok("a red cube")["input_ids"]


def test_the_export_resamples_as_the_transform_or_refuses():
    """Export's image processor takes the tower transform's interpolation to its PIL code
    (every mode PIL has); one PIL lacks (nearest-exact) is refused by name, not exported as
    bicubic."""
    import pytest
    from torchvision import transforms as T

    from trainer.export import image_processor

    def tf(mode):
        return T.Compose([T.Resize(32, interpolation=mode), T.CenterCrop(32), T.ToTensor(),
                          T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    M = T.InterpolationMode
    got = {m: image_processor(tf(m)).resample for m in (M.NEAREST, M.LANCZOS, M.BILINEAR,
                                                        M.BICUBIC, M.BOX, M.HAMMING)}
    assert got == {M.NEAREST: 0, M.LANCZOS: 1, M.BILINEAR: 2, M.BICUBIC: 3, M.BOX: 4, M.HAMMING: 5}
    with pytest.raises(ValueError, match="nearest-exact"):
        image_processor(tf(M.NEAREST_EXACT))
