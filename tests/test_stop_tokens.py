"""Chat models that end a turn with their own token stop there: Gemma's ``<end_of_turn>``,
Phi-3's ``<|end|>``, Llama-3's ``<|eot_id|>``. Tokenizers built like theirs (a SentencePiece-
style BPE for Gemma and Phi-3, a byte-level BPE for Llama-3, with their special tokens and chat
templates), a tiny LM for each, a one-step stage 2, then ``trainer generate`` and transformers'
own ``generate`` on the ``hf-llava`` export, both with an output head scripted to say a word, the
end-of-turn token, then more words: both must stop at the end of the turn."""

from __future__ import annotations

import pytest
import torch

from trainer.__main__ import main
from trainer.train import train

GEMMA_TEMPLATE = (  # google/gemma-2b-it's, verbatim
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3_TEMPLATE = (  # microsoft/Phi-3-mini-4k-instruct's
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

FAMILIES = {  # kind of BPE, specials (in id order), bos, eos, the end of turn, template
    "gemma": ("metaspace", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<end_of_turn>", GEMMA_TEMPLATE),
    "phi3": ("metaspace", ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                           "<|user|>", "<|system|>"], "<s>", "<|endoftext|>", "<|end|>", PHI3_TEMPLATE),
    "llama3": ("bytelevel", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE),
}


def _tokenizer(family: str, corpus: list[str]):
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    kind, specials, bos, eos, _, template = FAMILIES[family]
    bpe = SentencePieceBPETokenizer() if kind == "metaspace" else ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=2, special_tokens=specials,
                            show_progress=False)
    unk = "<unk>" if "<unk>" in specials else None
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=bos, eos_token=eos,
                                  unk_token=unk, pad_token="<pad>" if "<pad>" in specials else None)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat_llms(tmp_path_factory, instruct_json):
    """A folder per family: its tokenizer and a tiny random Llama-architecture LM."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    # no "<image>" in the corpus: a real LLM's vocabulary does not hold it as a word
    corpus = [t["value"].replace("<image>", "") for item in json.loads(instruct_json.read_text())
              for t in item["conversations"]] * 3 + ["model user assistant hi red blue"] * 20
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"llm-{family}")
        tok = _tokenizer(family, corpus)
        tok.save_pretrained(d)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False)).save_pretrained(d)
        out[family] = d
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_end_of_turn_token_is_found_from_the_template(family, chat_llms):
    from transformers import AutoTokenizer

    from trainer.prompts import stop_token_ids

    tok = AutoTokenizer.from_pretrained(chat_llms[family], local_files_only=True)
    *_, eos, eot, _ = FAMILIES[family]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids(eos), tok.convert_tokens_to_ids(eot)]
    assert stop_token_ids(tok, "plain") == [tok.eos_token_id]  # stage 1 captions end with EOS


def test_a_template_that_ends_turns_with_eos_adds_nothing(tiny_llm):
    from transformers import AutoTokenizer

    from trainer.prompts import VICUNA_V1, stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_llm, local_files_only=True)  # Vicuna's layout
    assert stop_token_ids(tok) == [tok.eos_token_id]
    tok.chat_template = VICUNA_V1  # llm.chat_template=vicuna_v1
    assert stop_token_ids(tok) == [tok.eos_token_id]


def _script(head: torch.nn.Module, ids: list[int]):
    """Make the output head say ``ids`` in turn (the last one forever), one per forward."""
    calls = [0]

    def hook(_mod, _inp, out):
        out = torch.full_like(out, -1e4)
        out[..., -1, ids[min(calls[0], len(ids) - 1)]] = 1e4
        calls[0] += 1
        return out

    return head.register_forward_hook(hook)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_and_the_export_stop_at_the_end_of_turn(family, chat_llms, finetune_cfg, sample,
                                                         tmp_path, capsys):
    from pathlib import Path

    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from trainer.final import load_final
    from trainer.generate import answer_ids

    run = train(finetune_cfg(f"llm.path={chat_llms[family]}", "optim.max_steps=1",
                             f"log.output={tmp_path / 'ft'}"), "finetune")["final"]
    mllm, tok, pre, meta = load_final(run)
    eot = tok.convert_tokens_to_ids(FAMILIES[family][4])
    red, blue = tok("red", add_special_tokens=False)["input_ids"][0], \
        tok("blue", add_special_tokens=False)["input_ids"][0]
    script = [red, eot, blue]
    image = sorted(Path(sample[1]).rglob("*.jpg"))[0]

    handle = _script(mllm.llm.get_output_embeddings(), script)
    assert answer_ids(mllm, tok, pre, meta, str(image), "What colour?", max_new_tokens=8) == [red, eot]
    handle.remove()

    out = tmp_path / "hf"
    assert main(["export", "--run", run, "--format", "hf-llava", "--out", str(out)]) == 0
    capsys.readouterr()
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert eot in model.generation_config.eos_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id
    img = Image.open(image).convert("RGB")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    inputs = processor(images=img, text=processor.apply_chat_template(conv, add_generation_prompt=True),
                       return_tensors="pt")
    _script(model.lm_head, script)
    with torch.no_grad():  # transformers' own generate, with only what the export wrote
        gen = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert gen[0, inputs["input_ids"].shape[1]:].tolist() == [red, eot]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_labels_cover_each_answer_and_its_end_of_turn(family, chat_llms):
    """Phi-3's template closes a conversation with EOS, which is gone once another turn
    follows; the turn masking must still find every assistant turn."""
    from transformers import AutoTokenizer

    from trainer.model import IGNORE_INDEX
    from trainer.prompts import build_chat

    tok = AutoTokenizer.from_pretrained(chat_llms[family], local_files_only=True)
    item = {"conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the other?"}, {"from": "gpt", "value": "blue"}]}
    ids, labels = build_chat(item, tok, has_image=True)
    eot = FAMILIES[family][4]
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    texts = [tok.decode(r).strip() for r in runs]
    assert [t.startswith(w) for t, w in zip(texts, ("red", "blue"), strict=True)] == [True, True], texts
    assert all(eot in t for t in texts), texts
