"""Turning a LLaVA-format sample into (input_ids, labels) with one IMAGE_TOKEN_INDEX.

- ``plain`` (stage 1, LLaVA's "plain" format): ``<s> <image> caption </s>``; loss on the
  caption and the end token only. LLaVA ends the caption with "\\n"; we end it with the
  tokenizer's EOS so the model learns to stop (our choice).
- ``chat`` (stage 2): the conversation rendered with the tokenizer's chat template (roles:
  human -> user, gpt -> assistant, system -> system) and tokenized whole (split only at
  ``<image>``), so the ids are those of the prompt at inference; loss only on the tokens that
  start inside an assistant turn (found by character offsets, hence a fast tokenizer). A
  tokenizer without a chat template (Vicuna-v1.5 ships none) is an error naming the fix:
  ``llm.chat_template=vicuna_v1`` installs LLaVA-1.5's ``conv_vicuna_v1`` (``VICUNA_V1``: its
  system line, then ``USER: ... ASSISTANT: ...</s>``) as the tokenizer's template, recorded in
  the run. ``<image>`` stays where it is in the first turn.
"""

from __future__ import annotations

import json

import torch

from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE = "<image>"
LLAVA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# LLaVA-1.5's conv_vicuna_v1 as a chat template (llm.chat_template=vicuna_v1); the system line
# double-quoted ("user's" holds a single quote)
VICUNA_V1 = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
             "{{ " + json.dumps(LLAVA_V1_SYSTEM + " ") + " }}{%- endif -%}"
             "{%- for m in messages -%}"
             "{%- if m['role'] == 'system' -%}{{ m['content'] + ' ' }}"
             "{%- elif m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + ' ' }}"
             "{%- else -%}{{ 'ASSISTANT: ' + m['content'] + (eos_token or '') }}{%- endif -%}"
             "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def _tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Text to (ids, start offsets), each '<image>' replaced by IMAGE_TOKEN_INDEX.

    The text is tokenized whole between images, never turn by turn: a SentencePiece
    tokenizer (Llama-2, Vicuna) tokenizes a piece that starts mid-text differently (a dummy
    ``▁`` prefix), so per-turn pieces would not be the ids the model sees at inference.
    Offsets say where each token starts in ``text``, to mask turns by character span.
    """
    ids: list[int] = []
    starts: list[int] = []
    base = 0
    for i, part in enumerate(text.split(IMAGE)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
            starts.append(base - len(IMAGE))
        if part:
            try:
                enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError:  # transformers 4's Python tokenizers
                enc = {}
            if "offset_mapping" not in enc:  # transformers 5's drop the option silently
                raise ValueError(
                    f"{type(tokenizer).__name__} gives no character offsets; the chat format "
                    "needs a fast (tokenizers-backed) tokenizer: load it with "
                    "AutoTokenizer.from_pretrained(path) without use_fast=False")
            ids.extend(enc["input_ids"])
            starts.extend(base + a for a, _ in enc["offset_mapping"])
        base += len(part) + len(IMAGE)
    return ids, starts


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


def use_chat_template(tokenizer, choice: str, where: str = "") -> None:
    """``llm.chat_template``: ``vicuna_v1`` installs LLaVA-1.5's format as the tokenizer's
    template; ``auto`` keeps the tokenizer's own and refuses one without."""
    if choice == "vicuna_v1":
        tokenizer.chat_template = VICUNA_V1
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError(no_template(where))


def no_template(where: str = "") -> str:
    return (f"the tokenizer{' of ' + where if where else ''} has no chat template, so stage 2 "
            f"does not know its prompt format: set llm.chat_template=vicuna_v1 (LLaVA-1.5's "
            f"conv_vicuna_v1, as for Vicuna-v1.5) or use an LLM whose tokenizer has one")


def _render(tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(no_template(getattr(tokenizer, "name_or_path", "")))
    return tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _turn_spans(tokenizer, msgs: list[dict]) -> tuple[str, list[tuple[int, int, str]]]:
    """The whole conversation rendered once, and each turn's (start, end, role) in it.

    Each user turn's span includes the generation prompt that follows it (``ASSISTANT:``),
    so an assistant span holds exactly what the model must produce. A template may close the
    whole conversation with special tokens that are gone once another turn follows (Phi-3's
    adds EOS after the last turn): such a tail of the shorter rendering is not part of its turn.
    """
    spans = []
    prev = ""
    for i, m in enumerate(msgs):
        nxt = msgs[i + 1]["role"] if i + 1 < len(msgs) else None
        text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=nxt == "assistant")
        if not text.startswith(prev):
            keep = _closing_tail(tokenizer, prev, text)
            if keep is None:
                raise ValueError("chat template output is not incremental; cannot mask turns")
            if spans:
                spans[-1] = (spans[-1][0], keep, spans[-1][2])
            prev = prev[:keep]
        spans.append((len(prev), len(text), m["role"]))
        prev = text
    return prev, spans


def _closing_tail(tokenizer, prev: str, text: str) -> int | None:
    """The longest prefix of ``prev`` that ``text`` continues and after which ``prev`` holds
    only special tokens and whitespace (a conversation's closing marks); None if there is none."""
    k = 0
    while k < min(len(prev), len(text)) and prev[k] == text[k]:
        k += 1
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    for cut in range(k, max(-1, k - 64), -1):  # back out of a special token cut in half
        tail = prev[cut:]
        for t in specials:
            tail = tail.replace(t, "")
        if not tail.strip():
            return cut
    return None


def _with_bos(tokenizer, text: str, ids: list[int], labels: list[int] | None = None):
    bos = tokenizer.bos_token_id
    if bos is not None and not text.startswith(tokenizer.bos_token):  # template had no BOS
        ids.insert(0, bos)
        if labels is not None:
            labels.insert(0, IGNORE_INDEX)


def build_chat(item: dict, tokenizer, has_image: bool) -> tuple[list[int], list[int]]:
    """Ids of the whole rendered conversation; labels on tokens that start in an assistant
    turn (its text and end token), IGNORE_INDEX elsewhere."""
    text, spans = _turn_spans(tokenizer, _messages(item, has_image))
    ids, starts = _tokens(tokenizer, text)
    answer = [(a, b) for a, b, role in spans if role == "assistant"]
    labels = [t if any(a <= s < b for a, b in answer) and t != IMAGE_TOKEN_INDEX else IGNORE_INDEX
              for t, s in zip(ids, starts, strict=True)]
    _with_bos(tokenizer, text, ids, labels)
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


_PROBE = "seaXprobeXturn"  # an assistant reply no template trims or escapes


def stop_token_ids(tokenizer, fmt: str = "chat") -> list[int]:
    """The ids a reply ends with: EOS, and in the chat format the special token the tokenizer's
    chat template closes an assistant turn with, when that is not EOS.

    Found from the template itself, not a table of models: one assistant turn is rendered with a
    probe reply and the first token after the probe is taken if it is a special token (Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``, Llama-3's ``<|eot_id|>``, ChatML's ``<|im_end|>``).
    Templates that close a turn with EOS itself (Vicuna's, Llama-2's) add nothing. The plain
    format (stage 1) ends every caption with EOS (``build_plain``).
    """
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt != "chat":
        return ids
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = _render(tokenizer, msgs, add_generation_prompt=False)
    if _PROBE not in text:
        return ids
    tail = text[text.rindex(_PROBE) + len(_PROBE):]
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    if first and first[0] in special and first[0] not in ids:
        ids.append(first[0])
    return ids


def generation_prompt(tokenizer, prompt: str, fmt: str, has_image: bool = True) -> torch.Tensor:
    """Input ids for answering ``prompt`` about an image: the same layout as training."""
    if fmt == "plain":  # stage 1 learned to caption what follows the image
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids += [IMAGE_TOKEN_INDEX] if has_image else []
        return torch.tensor(ids, dtype=torch.long)
    content = (IMAGE + "\n" + prompt) if has_image and IMAGE not in prompt else prompt
    return torch.tensor(conversation_prompt(tokenizer, [{"role": "user", "content": content}]),
                        dtype=torch.long)


def conversation_prompt(tokenizer, msgs: list[dict]) -> list[int]:
    """Input ids asking for the next assistant turn of ``msgs`` (role/content dicts, ``<image>``
    in a turn's text), rendered and tokenized exactly as training renders a conversation."""
    text = _render(tokenizer, msgs, add_generation_prompt=True)
    ids, _ = _tokens(tokenizer, text)
    _with_bos(tokenizer, text, ids)
    return ids
