"""Stage-2 prompts with SentencePiece tokenizers (Llama-2, Vicuna), built offline.

A legacy SentencePiece tokenizer tokenizes a piece that starts mid-text with a dummy "▁"
prefix, so tokenizing a conversation turn by turn gives other ids than the prompt the model
sees at inference and puts a lone "▁" token inside the loss. The reference here is the whole
rendered prompt tokenized at once (split only at <image>, as LLaVA's ``tokenizer_image_token``
does, transcribed below).
"""

import copy
import json
import shutil

import pytest
import torch

from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trainer.prompts import IMAGE, VICUNA_V1, _messages, _render, build_sample, generation_prompt

spm = pytest.importorskip("sentencepiece")

LLAMA2_TEMPLATE = (  # Llama-2-chat's layout, without its system-prompt branch
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Look at this. What colour is the circle? ASSISTANT: A red circle.",
    "USER: And the background? ASSISTANT: It is blue. [INST] [/INST]",
    "What is 2 plus 3? The answer is 5. How many squares are there? There are two squares.",
]

ITEM = {"conversations": [
    {"from": "human", "value": "Look at this.\n<image>"}, {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "And the background?"}, {"from": "gpt", "value": "It is blue."}]}
TEXT_ONLY = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                               {"from": "gpt", "value": "The answer is 5."},
                               {"from": "human", "value": "How many squares?"},
                               {"from": "gpt", "value": "There are two squares."}]}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n")
    spm.SentencePieceTrainer.train(  # Llama's settings: BPE, byte fallback, digits split
        input=str(corpus), model_prefix=str(d / "tok"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return d / "tok.model"


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def fast_tok(request, spm_model, tmp_path_factory):
    """Llama's tokenizer loaded from a folder holding only the SentencePiece model, as
    Vicuna's and Llama-2's repositories ship it (converted on load by transformers)."""
    from transformers import AutoTokenizer

    src = tmp_path_factory.mktemp("spm-src")
    shutil.copy(spm_model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": request.param, "add_bos_token": True}))
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    scheme = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"]
    assert scheme == ("always" if request.param else "first") and len(tok) == 500
    return tok


def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = LLAMA2_TEMPLATE if template else VICUNA_V1  # llm.chat_template=vicuna_v1
    return tok


def tokenizer_image_token(prompt, tokenizer):
    """LLaVA's llava/mm_utils.py::tokenizer_image_token, transcribed."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def _ids(tok, text):
    """The reference tokenization: a rendered text tokenized at once. A template that writes
    BOS itself is tokenized as transformers' apply_chat_template(tokenize=True) does (no
    special tokens added); LLaVA's conv_vicuna_v1, which writes none, as LLaVA does."""
    if text.startswith(tok.bos_token):
        chunks = [tok(c, add_special_tokens=False).input_ids for c in text.split(IMAGE)]
        return [i for k, c in enumerate(chunks) for i in ([IMAGE_TOKEN_INDEX] if k else []) + c]
    return tokenizer_image_token(text, tok)


def _reference(tok, item, has_image):
    """Whole-prompt ids, and labels from prefix lengths: answer k covers the tokens between
    the prompt before it and the prompt through it (valid where each prefix's ids are a
    prefix of the whole's, which is checked)."""
    msgs = _messages(item, has_image)
    ids = _ids(tok, _render(tok, msgs, add_generation_prompt=False))
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = _ids(tok, _render(tok, msgs[:i], add_generation_prompt=True))
            through = _ids(tok, _render(tok, msgs[: i + 1], add_generation_prompt=False))
            assert ids[: len(through)] == through and through[: len(before)] == before
            labels[len(before): len(through)] = through[len(before):]
    return ids, labels


@pytest.mark.parametrize("template", [False, True], ids=["vicuna_v1", "chat-template"])
@pytest.mark.parametrize("item,has_image", [(ITEM, True), (TEXT_ONLY, False)], ids=["image", "text"])
def test_conversation_ids_are_the_whole_prompt_tokenized_at_once(fast_tok, template, item, has_image):
    tok = _with_template(fast_tok, template)
    ids, labels = build_sample(item, tok, "chat", has_image=has_image)
    ref_ids, ref_labels = _reference(tok, item, has_image)
    assert ids.tolist() == ref_ids
    assert labels.tolist() == ref_labels
    if template and not has_image:  # and transformers' own tokenization of the chat
        msgs = [{"role": m["role"], "content": m["content"]} for m in _messages(item, False)]
        assert ids.tolist() == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    # each answer starts with its first word, not a stray "▁"
    lone = tok.convert_tokens_to_ids("▁")
    sup = labels != IGNORE_INDEX
    starts = sup & ~torch.cat([torch.tensor([False]), sup[:-1]])
    assert starts.sum() == 2 and lone not in ids[starts].tolist()
    want = [t["value"] for t in item["conversations"] if t["from"] == "gpt"]
    got = tok.decode(ids[sup].tolist()).split(tok.eos_token)[:-1]
    assert [g.strip() for g in got] == want


@pytest.mark.parametrize("template", [False, True], ids=["vicuna_v1", "chat-template"])
def test_generation_prompt_is_the_training_prefix(fast_tok, template):
    """What generate feeds the model is token for token what training put before the answer."""
    tok = _with_template(fast_tok, template)
    item = {"conversations": ITEM["conversations"][:2]}
    ids, labels = build_sample(item, tok, "chat", has_image=True)
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    prompt = generation_prompt(tok, "Look at this.\n" + IMAGE, "chat")
    assert prompt.tolist() == ids[:first].tolist()


def test_slow_tokenizer_is_refused_with_the_fix(spm_model):
    from transformers.models.bert_generation import BertGenerationTokenizer

    slow = BertGenerationTokenizer(vocab_file=str(spm_model))  # a Python SentencePiece tokenizer
    slow.chat_template = VICUNA_V1
    with pytest.raises(ValueError, match="needs a fast"):
        build_sample(ITEM, slow, "chat", has_image=True)
    assert torch.is_tensor(build_sample(ITEM, slow, "plain", has_image=True)[0])


def test_vicuna_v1_renders_llavas_conv_vicuna_v1(fast_tok):
    """``llm.chat_template=vicuna_v1`` is LLaVA-1.5's ``conv_vicuna_v1.get_prompt()``
    (llava/conversation.py, SeparatorStyle.TWO, sep " ", sep2 "</s>"), transcribed here with
    its system line literally; the template's own string once broke Jinja on "user's"."""
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    seps = [" ", "</s>"]
    turns = [("USER", "<image>\nWhat is it?"), ("ASSISTANT", "A cube."), ("USER", "Colour?"),
             ("ASSISTANT", None)]
    want = system + seps[0]
    for i, (role, message) in enumerate(turns):
        want += role + ": " + message + seps[i % 2] if message else role + ":"
    tok = copy.deepcopy(fast_tok)
    tok.chat_template = VICUNA_V1
    msgs = [{"role": "user" if r == "USER" else "assistant", "content": m} for r, m in turns[:3]]
    assert tok.eos_token == "</s>"
    assert _render(tok, msgs, add_generation_prompt=True) == want
