"""Stage 2, multi-process training and exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trainer.prompts import build_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm)


def _supervised_text(tok, ids, labels):
    return tok.decode(ids[labels != IGNORE_INDEX].tolist())


@pytest.mark.parametrize("template", [True, False])
def test_assistant_only_masking(tok, template):
    if not template:  # llm.chat_template=vicuna_v1: LLaVA-1.5's layout
        from trainer.prompts import VICUNA_V1

        tok = type(tok).from_pretrained(tok.name_or_path)
        tok.chat_template = VICUNA_V1
    item = {"conversations": [
        {"from": "human", "value": "Look at this.\n<image>"}, {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "And the background?"}, {"from": "gpt", "value": "It is blue."}]}
    ids, labels = build_sample(item, tok, "chat", has_image=True)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert _supervised_text(tok, ids, labels) == " A red circle.</s> It is blue.</s>"
    full = tok.decode([i for i in ids.tolist() if i != IMAGE_TOKEN_INDEX])
    head = "<s>USER: " if template else "<s>A chat between a curious user"
    assert full.startswith(head) and "USER: Look at this.\n" in full  # <image> kept in place
    assert ids.tolist().index(IMAGE_TOKEN_INDEX) > 3
    text_only = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                                   {"from": "gpt", "value": "5."}]}
    ids, labels = build_sample(text_only, tok, "chat", has_image=False)
    assert IMAGE_TOKEN_INDEX not in ids.tolist()
    assert _supervised_text(tok, ids, labels) == " 5.</s>"


def test_finetune_trains_llm_and_adapter_from_stage1(finetune_cfg, pretrain_cfg, tmp_path):
    from safetensors.torch import load_file

    from trainer.train import build, train_step

    stage1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=2"))
    p = build(finetune_cfg(f"init_from={stage1['final']}"), "finetune")
    adapter = load_file(str(tmp_path / "s1" / "final" / "adapter.safetensors"))
    torch.testing.assert_close(p.task.mllm.adapter[0].weight, adapter["adapter.0.weight"])
    before = {n: t.detach().clone() for n, t in p.task.named_parameters()}
    p.task.train()
    p.dataset.set_position(0, 0)
    it = iter(p.dataset)
    train_step(p, [next(it) for _ in range(p.accum)], 0)
    changed = {n.split(".")[1] for n, t in p.task.named_parameters() if not torch.equal(t, before[n])}
    assert changed == {"adapter", "llm"}  # vision frozen at vision_lr = 0
    p2 = build(finetune_cfg("optim.vision_lr=1e-3"), "finetune")
    assert len(p2.optimizer.param_groups) == 2 and p2.optimizer.param_groups[1]["lr"] == 1e-3


def train(cfg, stage="pretrain", **kw):
    from trainer.train import train as _train

    return _train(cfg, stage, **kw)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_kill_and_resume_gives_the_same_losses(stage, pretrain_cfg, finetune_cfg, tmp_path):
    make = pretrain_cfg if stage == "pretrain" else finetune_cfg
    common = ["optim.epochs=2", "data.num_workers=2"]
    if stage == "pretrain":
        common.append("optim.lr=1e-2")
    else:
        common.append("sea.weight=0")
    full = train(make(*common, f"log.output={tmp_path / 'full'}"), stage)
    n = len(full["losses"])
    assert n >= 8
    # killed after step 5 with the last checkpoint at step 4 (and an epoch boundary ahead)
    out = tmp_path / "killed"
    part = train(make(*common, f"log.output={out}", "log.save_every=4"), stage, stop_after=5)
    assert part["stopped_early"] and part["losses"] == full["losses"][:5]
    assert checkpoint.latest(out).name == "step-00000004"
    rest = train(make(*common, f"log.output={out}", "log.save_every=4", "resume=latest"), stage)
    assert rest["losses"] == full["losses"][4:]  # identical floats on CPU
    # a resume with another config is refused, naming the key
    with pytest.raises(ValueError, match="optim.lr"):
        train(make(*common, f"log.output={out}", "optim.lr=0.5", "resume=latest"), stage)


def test_half_written_or_corrupted_checkpoint_is_never_latest(tmp_path):
    w = {"a": torch.ones(3)}
    good = checkpoint.save(tmp_path, 2, w, {"x": 1}, {})
    assert checkpoint.latest(tmp_path) == good
    # a later save killed before its marker
    bad = checkpoint.save(tmp_path, 4, w, {"x": 2}, {})
    (bad / checkpoint.MARKER).unlink()
    # a later save whose weights were truncated afterwards
    trunc = checkpoint.save(tmp_path, 6, w, {"x": 3}, {})
    shard = next((trunc / checkpoint.SHARDS).iterdir())
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    # a temporary folder of a save in progress
    (tmp_path / "checkpoints" / ".tmp-step-00000008-1").mkdir()
    assert checkpoint.latest(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(trunc)
    # keep-last counts only complete ones
    for s in (10, 12, 14):
        checkpoint.save(tmp_path, s, w, {}, {}, keep=2)
    assert [p.name for p in checkpoint.list_complete(tmp_path)] == ["step-00000012", "step-00000014"]


def _torchrun(nproc, stage, out, overrides):
    if nproc == 1:  # the reference: one plain process, this one (no torchrun start-up)
        import _dist_worker

        _dist_worker.main([stage, str(out), *overrides])
        return torch.load(out, weights_only=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: torchrun picks its own free rendezvous port (no race with a port we pick)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(REPO / "tests" / "_dist_worker.py"), stage,
           str(out), *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return torch.load(out, weights_only=False)


def _as_args(cfg) -> list[str]:
    from seacore.config import to_dict

    out = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif v is not None:
                out.append(f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}")
            else:
                out.append(f"{prefix}{k}=null")

    walk("", to_dict(cfg))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,strategy", [("pretrain", "ddp"), ("finetune", "fsdp")])
def test_two_gloo_processes_match_one(stage, strategy, pretrain_cfg, finetune_cfg, tmp_path):
    make = pretrain_cfg if stage == "pretrain" else finetune_cfg
    cfg = make("optim.global_batch_size=4", "optim.micro_batch_size=2", f"dist.strategy={strategy}")
    args = _as_args(cfg)
    one = _torchrun(1, stage, tmp_path / "one.pt", args)
    two = _torchrun(2, stage, tmp_path / "two.pt", args)
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    if stage == "pretrain":
        assert "align.log_tau" in one["grads"] and sum(two["pairs"]) > 0


@pytest.mark.slow
def test_gathered_negatives_run_across_ranks(pretrain_cfg, tmp_path):
    cfg = pretrain_cfg("optim.global_batch_size=4", "optim.micro_batch_size=2",
                       "sea.gather_negatives=true")
    two = _torchrun(2, "pretrain", tmp_path / "g.pt", _as_args(cfg))
    assert len(two["pairs"]) == 2 and two["pairs"][0] == two["pairs"][1] > 0  # every rank sees all


def test_generate_answers_with_a_tiny_trained_model(finetune_cfg, sample, capsys):
    from trainer.__main__ import main

    res = train(finetune_cfg("optim.max_steps=2"), "finetune")
    image = next(Path(sample[1]).rglob("*.jpg"))
    rc = main(["generate", "--checkpoint", str(Path(res["final"]).parent), "--image", str(image),
               "--prompt", "What is in the picture?", "--max-new-tokens", "5", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    assert out  # some decoded text from the tiny model
    meta = json.loads((Path(res["final"]) / "sea_model.json").read_text())
    assert meta["stage"] == "finetune" and (Path(res["final"]) / meta["llm"] / "config.json").is_file()


def test_stage2_reads_labels_where_they_exist(finetune_cfg, label_run, tiny_llm):
    """Stage 2 streams the whole instruction JSON (text-only samples too) and attaches labels
    by image path; batches mixing labelled and unlabelled images keep their alignment."""
    from pipeline.shards import SENTINEL
    from trainer.train import build, train_step

    p = build(finetune_cfg(f"data.shards={label_run}", "sea.weight=1"), "finetune")
    assert p.source.total_rows == len(p.source.conv)  # the JSON, not the shard rows
    seen_text_only = seen_labels = 0
    p.dataset.set_position(0, 0)
    batches = list(p.dataset)
    for b in batches:
        seen_text_only += sum(not h for h in b["has_image"])
        if "label_ids" in b:
            assert b["label_ids"].shape[0] == b["pixels"].shape[0]
            seen_labels += int((b["label_ids"][:, 0, 0] != SENTINEL).sum())
    assert seen_text_only == 4 and seen_labels == 24
    p.task.train()
    m = train_step(p, batches[: p.accum], 0)
    assert m["loss"] > 0


def test_a_tokenizer_without_chat_template_is_refused_or_given_vicuna_v1_explicitly(
        finetune_cfg, tiny_llm, tmp_path):
    """Issue 36: stage 2 with a tokenizer that has no chat template (base Llama, Mistral,
    Vicuna-v1.5) used to get Vicuna's format silently; now it stops naming the option, and
    ``llm.chat_template=vicuna_v1`` trains with LLaVA-1.5's format, recorded in final/ so that
    generate uses it too."""
    import shutil

    from trainer.final import load_final
    from trainer.prompts import VICUNA_V1
    from trainer.train import build, train

    bare = tmp_path / "llm-no-template"
    shutil.copytree(tiny_llm, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = bare / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llm.chat_template=vicuna_v1"):
        build(finetune_cfg(f"llm.path={bare}"), "finetune")
    run = train(finetune_cfg(f"llm.path={bare}", "llm.chat_template=vicuna_v1", "sea.weight=0",
                             "optim.max_steps=1", f"log.output={tmp_path / 'ft'}"), "finetune")
    meta = json.loads((Path(run["final"]) / "sea_model.json").read_text())
    assert meta["chat_template"] == "vicuna_v1"
    _, tok, _, _ = load_final(run["final"])
    assert tok.chat_template == VICUNA_V1
