"""Generate a random-weight Llama and an offline byte-level BPE tokenizer (no model hub needed).

Weights use std 0.05: at the usual 0.02 a random model repeats one token, and equal
outputs between PD and aggregated serving would then prove little.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {
    # name: layers, hidden, heads, kv_heads, intermediate
    "tiny": (2, 128, 4, 2, 256),
    "bench": (8, 1024, 8, 4, 1024),  # 32 KiB of fp32 KV per token: a realistic per-token transfer size
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "vo", "pi", "da", "shi", "ran", "tor", "el", "qu", "bo"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += "the a of to and in is it that for on with as was at by an be this from".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + rng.choice([".", "?", "!"])
            for _ in range(n_lines)]


def make_tokenizer(out: Path, vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(4000, seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_tiny_model(out: str | Path, size: str = "tiny", seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write a model directory vLLM can serve with `--model out`; idempotent for the same args."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    stamp = out / "kvbridge_model.json"
    want = {"size": size, "seed": seed, "vocab_size": vocab_size}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    layers, hidden, heads, kv_heads, inter = SIZES[size]
    tok = make_tokenizer(out, vocab_size, seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      initializer_range=0.05, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    stamp.write_text(json.dumps(want))
    return out
