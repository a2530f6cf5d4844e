"""A tiny Hugging Face causal LM and tokenizer, built offline and saved as a model folder.

The tokenizer is a byte-level BPE (GPT-2 style: a leading space is part of a token) trained
with ``tokenizers`` on the word list plus the captions it will see, so it behaves like a
real LLM tokenizer: common words are one token, rare words split into pieces. The folder
loads with ``AutoModelForCausalLM.from_pretrained(path)``: the same code as a real LLM.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tiny_llm(out_dir: str | Path, words, seed: int = 0, vocab_size: int = 4096,
                  hidden: int = 64, layers: int = 2, heads: int = 4,
                  extra_text: list[str] | None = None, arch: str = "llama",
                  intermediate: int | None = None) -> str:
    """Train a tokenizer on ``words`` (and ``extra_text``, the sentences the model will see,
    so their words become single tokens), build a random LM, save both; return the path.
    ``arch``: llama (Vicuna, Llama-3), gemma (tied embeddings, its own head size) or phi3
    (fused qkv), the LLM families of the paper's rows."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(words[i:i + 64]) for i in range(0, len(words), 64)]
    corpus += list(extra_text or []) * max(1, 2000 // max(1, len(extra_text or [1])))
    corpus += ["USER: ASSISTANT:"] * 50
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or hidden * 4,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=hidden // heads,
                                             tie_word_embeddings=True))
    elif arch == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM

        model = Phi3ForCausalLM(Phi3Config(**common, tie_word_embeddings=False))
    else:
        raise ValueError(f"arch must be llama, gemma or phi3, got {arch}")
    from seacore.quiet import no_loading_bars

    with no_loading_bars():  # transformers' "Writing model shards" bar
        model.save_pretrained(out, safe_serialization=True)
    return str(out)
