"""Hub-free stand-ins for the benchmark: an InternLM3-8B-shaped Llama with random weights, a word-level
tokenizer of the same vocabulary size with an InternLM-style chat template, and Alpaca-style rows whose token
lengths follow a distribution like Alpaca-GPT4's.

Token lengths (one word of the synthetic text = one token of this tokenizer), chosen to approximate
Alpaca-GPT4 as tokenised by a ~128k-vocabulary Llama-family tokenizer (the dataset itself is not reachable
offline, so these are the assumption every figure rests on; see bench/README.md):
- instruction: log-normal, median 14 tokens, sigma 0.55, clipped to [3, 120]
- input: present in 40 % of rows; log-normal, median 18, sigma 0.9, clipped to [2, 400]
- output: log-normal, median 175, sigma 0.7, clipped to [5, 1200]
- chat template: 7 tokens per row (<s>, role markers)
That gives a mean of ~255 tokens per row (median ~205); 7.6 % of rows exceed 512 and are truncated, so
a row trains on ~240 tokens on average.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ROLE_TOKENS = ["system", "user", "assistant"]
# The words of the FlowerTune template's prompt (clientapp/flowertune_format.py, the default
# train.prompt-format): whitespace-split, so its response tag `### Response:` is two tokens here
TEMPLATE_WORDS = [
    "###", "Below", "Instruction:", "Response:", "Write", "a", "an", "appropriately", "completes",
    "describes",
    "instruction", "is", "request.", "response", "task.", "that", "the",
]
NEWLINE = "<nl>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_TOKENS = 7  # <s> + 2 × (<|im_start|>, role, <|im_end|>)


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 50_000_000.0

    def llama_config(self, **overrides: Any):
        from transformers import LlamaConfig

        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=32768,
            rope_theta=self.rope_theta,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=4,
            pad_token_id=2,
            initializer_range=0.02,
        )
        kwargs.update(overrides)
        config = LlamaConfig(**kwargs)
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict):  # transformers 5 keeps θ here
            rope["rope_theta"] = self.rope_theta
        return config

    def matmul_params(self) -> int:
        """Parameters that take part in matrix products per token (decoder linears + LM head)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q + kv + o + mlp) + self.hidden * self.vocab

    def total_params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.matmul_params() + self.hidden * self.vocab + norms

    def train_flops_per_token(self, mean_context: float) -> float:
        """LoRA training on a frozen base: forward (2N) + input gradients (2N); attention scores and
        values at the mean causal context, forward + backward. Recomputation is not counted."""
        attention = 3 * 4 * self.layers * self.heads * self.head_dim * mean_context
        return 4.0 * self.matmul_params() + attention


INTERNLM3_8B = Shape(
    hidden=4096, intermediate=10240, layers=48, heads=32, kv_heads=2, head_dim=128, vocab=128512
)
TINY = Shape(hidden=256, intermediate=640, layers=2, heads=4, kv_heads=2, head_dim=64, vocab=4096)
# The 8B's 48 layers (so its adapter is the same 384 tensors on the wire) at a CPU-sized width: for timing the
# per-object transport cost without a GPU (bench/federation.py)
DEEP_TINY = Shape(hidden=64, intermediate=128, layers=48, heads=4, kv_heads=2, head_dim=16, vocab=4096)
H100_BF16_DENSE_FLOPS = 989.4e12  # H100 SXM datasheet, dense bf16


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: 'w<i>' words, InternLM-like special tokens and chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixed = SPECIAL_TOKENS + ROLE_TOKENS + TEMPLATE_WORDS + [NEWLINE]
    vocab = {token: i for i, token in enumerate(fixed)}
    for i in range(vocab_size - len(fixed)):
        vocab[f"w{i}"] = len(fixed) + i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A line break is two tokens, as in Llama-family BPE (the FlowerTune template drops the first two tokens
    # of its encoded "\n### Response:" tag for that reason)
    core.normalizer = normalizers.Replace("\n", f" {NEWLINE} {NEWLINE} ")
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int):
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def alpaca_like_rows(n: int, seed: int, vocab_size: int) -> list[dict[str, str]]:
    """Alpaca-format rows (instruction, input, output) of synthetic words, Zipf-distributed."""
    rng = np.random.default_rng(seed)
    words = vocab_size - len(SPECIAL_TOKENS) - len(ROLE_TOKENS) - len(TEMPLATE_WORDS) - 1
    ranks = np.arange(1, words + 1, dtype=np.float64)
    cdf = np.cumsum(1.0 / (ranks + 20.0) ** 1.05)
    cdf /= cdf[-1]

    def text(length: int) -> str:
        ids = np.searchsorted(cdf, rng.random(length))
        return " ".join(f"w{i}" for i in ids)

    instruction = _lognormal_lengths(rng, n, 14, 0.55, 3, 120)
    has_input = rng.random(n) < 0.4
    context = _lognormal_lengths(rng, n, 18, 0.9, 2, 400)
    output = _lognormal_lengths(rng, n, 175, 0.7, 5, 1200)
    return [
        {
            "instruction": text(int(instruction[i])),
            # alpaca_to_conversation joins instruction and input with a blank line (no token here)
            "input": text(int(context[i])) if has_input[i] else "",
            "output": text(int(output[i])),
        }
        for i in range(n)
    ]


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def row_tokens(row: dict[str, str]) -> int:
    words = len(row["instruction"].split()) + len(row["input"].split()) + len(row["output"].split())
    return words + TEMPLATE_TOKENS


def build_model_dir(target: Path, shape: Shape, device: str = "cpu", seed: int = 0) -> Path:
    """Random bf16 weights in a transformers folder (config, safetensors, tokenizer, chat template)."""
    import torch
    from transformers import LlamaForCausalLM, set_seed

    target.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    config = shape.llama_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(target, max_shard_size="4GB")
    del model
    build_tokenizer(shape.vocab).save_pretrained(target)
    return target
