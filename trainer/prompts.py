"""Turning a LLaVA-format sample into (input_ids, labels) with one IMAGE_TOKEN_INDEX.

- ``plain`` (stage 1, LLaVA's "plain" format): ``<s> <image> caption </s>``; loss on the
  caption and the end token only. LLaVA ends the caption with "\\n"; we end it with the
  tokenizer's EOS so the model learns to stop (our choice).
- ``chat`` (stage 2): the conversation rendered turn by turn with the tokenizer's chat
  template (roles: human -> user, gpt -> assistant, system -> system); loss only on the
  assistant turns' tokens. Without a chat template (Vicuna-v1.5 has none) the fallback is
  LLaVA-1.5's ``conv_vicuna_v1``: its system line, then ``USER: ... ASSISTANT: ...</s>``.
  ``<image>`` stays where it is in the first turn.
"""

from __future__ import annotations

import torch

from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE = "<image>"
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def _tokens(tokenizer, text: str) -> list[int]:
    """Text to ids, with each '<image>' replaced by IMAGE_TOKEN_INDEX."""
    out: list[int] = []
    for i, part in enumerate(text.split(IMAGE)):
        if i:
            out.append(IMAGE_TOKEN_INDEX)
        if part:
            out.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return out


def _messages(item: dict, has_image: bool) -> list[dict]:
    msgs = []
    for turn in item.get("conversations", []):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"unknown conversation role {turn.get('from')!r}")
        text = turn.get("value", "")
        if not has_image:
            text = text.replace(IMAGE, "").strip()
        msgs.append({"role": role, "content": text})
    if has_image and not any(IMAGE in m["content"] for m in msgs[:1]):
        # LLaVA's convention: an image sample without the token gets it at the start
        msgs[0]["content"] = IMAGE + "\n" + msgs[0]["content"]
    return msgs


def _render(tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = "" if msgs and msgs[0]["role"] == "system" else LLAVA_V1_SYSTEM + " "
    for m in msgs:
        if m["role"] == "system":
            text += m["content"] + " "
        elif m["role"] == "user":
            text += f"USER: {m['content']} "
        else:
            text += f"ASSISTANT: {m['content']}{tokenizer.eos_token or ''}"
    return text + ("ASSISTANT:" if add_generation_prompt else "")


def build_chat(item: dict, tokenizer, has_image: bool) -> tuple[list[int], list[int]]:
    msgs = _messages(item, has_image)
    ids: list[int] = []
    labels: list[int] = []
    bos = tokenizer.bos_token_id
    prev = ""
    for i, m in enumerate(msgs):
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=nxt == "assistant")
        if not text.startswith(prev):
            raise ValueError("chat template output is not incremental; cannot mask turns")
        piece = _tokens(tokenizer, text[len(prev):])
        prev = text
        ids.extend(piece)
        labels.extend(piece if m["role"] == "assistant" else [IGNORE_INDEX] * len(piece))
    if bos is not None and not prev.startswith(tokenizer.bos_token):  # template had no BOS
        ids.insert(0, bos)
        labels.insert(0, IGNORE_INDEX)
    return ids, labels


def build_plain(item: dict, tokenizer, has_image: bool) -> tuple[list[int], list[int]]:
    turns = item.get("conversations", [])
    caption = next((t["value"] for t in turns if ROLES.get(t.get("from")) == "assistant"), None)
    if caption is None:
        raise ValueError(f"sample {item.get('id')} has no caption (assistant turn)")
    cap = tokenizer(caption.strip(), add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if has_image:
        prefix.append(IMAGE_TOKEN_INDEX)
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = prefix + cap + tail
    labels = [IGNORE_INDEX] * len(prefix) + cap + tail
    return ids, labels


def build_sample(item: dict, tokenizer, fmt: str, has_image: bool):
    build = {"plain": build_plain, "chat": build_chat}[fmt]
    ids, labels = build(item, tokenizer, has_image)
    if has_image and ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise ValueError(f"sample {item.get('id')}: expected one <image>, found {ids.count(IMAGE_TOKEN_INDEX)}")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def generation_prompt(tokenizer, prompt: str, fmt: str, has_image: bool = True) -> torch.Tensor:
    """Input ids for answering ``prompt`` about an image: the same layout as training."""
    if fmt == "plain":  # stage 1 learned to caption what follows the image
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids += [IMAGE_TOKEN_INDEX] if has_image else []
        return torch.tensor(ids, dtype=torch.long)
    content = (IMAGE + "\n" + prompt) if has_image and IMAGE not in prompt else prompt
    text = _render(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    ids = _tokens(tokenizer, text)
    if tokenizer.bos_token_id is not None and not text.startswith(tokenizer.bos_token):
        ids.insert(0, tokenizer.bos_token_id)
    return torch.tensor(ids, dtype=torch.long)
