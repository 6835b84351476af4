"""The leaderboard's communication formula applied to what a codec sends, from shapes alone.

The FlowerTune leaderboard counts a message as Flower's `ArrayRecord.count_bytes()`: Σ over its arrays of
(the array's .npy serialisation + its key). A codec's message is the arrays of `fedtune.codecs.layout`, so its
cost follows from the adapter's shapes without building any array: scales and the `:q`/`:s` key suffixes are
counted like everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedtune import packing
from fedtune.codecs import CodecSpec, Shape, layout

MB = 1024 * 1024


def leaderboard_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """count_bytes() of an ArrayRecord holding exactly these arrays (fedtune.packing's formula)."""
    return packing.leaderboard_bytes(packing.specs_of(arrays))


def message_bytes(shapes: Mapping[str, Shape], codec: str, block: int) -> int:
    """count_bytes() of the message carrying tensors of `shapes` under `codec`."""
    return packing.leaderboard_bytes(
        spec for key, tensor_shape in shapes.items() for spec in layout(codec, key, tensor_shape, block)
    )


@dataclass(frozen=True)
class Budget:
    down_bytes: int  # one download (server → one node)
    up_bytes: int  # one upload
    rounds: int
    nodes_per_round: int

    @property
    def total_bytes(self) -> int:
        return self.rounds * self.nodes_per_round * (self.down_bytes + self.up_bytes)

    @property
    def total_mb(self) -> float:
        return self.total_bytes / MB


def run_budget(
    shapes: Mapping[str, Shape], spec: CodecSpec, rounds: int = 10, nodes_per_round: int = 2
) -> Budget:
    """The leaderboard budget of a run whose every sampled node trains every round (no failures)."""
    sent = {k: shapes[k] for k in spec.sent_keys(shapes)}
    return Budget(
        message_bytes(sent, spec.download, spec.block_size),
        message_bytes(sent, spec.upload, spec.block_size),
        rounds,
        nodes_per_round,
    )


def llama_lora_shapes(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    r: int,
    targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> dict[str, Shape]:
    """peft's adapter keys and shapes for LoRA on a Llama-architecture model's attention projections
    (`get_peft_model_state_dict` order), from the architecture's numbers alone."""
    out_features = {
        "q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
        "o_proj": hidden,
    }
    in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim}
    targets = list(targets)
    shapes: dict[str, Shape] = {}
    for layer in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if name not in targets:
                continue
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            shapes[f"{prefix}.lora_A.weight"] = (r, in_features[name])
            shapes[f"{prefix}.lora_B.weight"] = (out_features[name], r)
    return shapes


def internlm3_8b_lora_shapes(r: int = 16) -> dict[str, Shape]:
    """The reference configuration's adapter: InternLM3-8B-Instruct (hidden 4096, 48 layers, 32 heads,
    2 KV heads, head dim 128), LoRA r=16 on q/k/v/o: 384 tensors, 19,267,584 values."""
    return llama_lora_shapes(hidden=4096, layers=48, heads=32, kv_heads=2, head_dim=128, r=r)


# The table docs/communication.md shows (name → settings), in order of falling bytes.
TABLE_SPECS: dict[str, CodecSpec] = {
    "none (fp32, the reference)": CodecSpec(),
    "bf16": CodecSpec("bf16", "bf16"),
    "int8": CodecSpec("int8", "int8"),
    "int8 down, nf4 up": CodecSpec("nf4", "int8"),
    "nf4": CodecSpec("nf4", "nf4"),
    "int4": CodecSpec("int4", "int4"),
    "ffa-lora (fp32)": CodecSpec(ffa_lora=True),
    "ffa-lora + bf16": CodecSpec("bf16", "bf16", ffa_lora=True),
    "ffa-lora + int8": CodecSpec("int8", "int8", ffa_lora=True),
    "ffa-lora + int8 down, nf4 up": CodecSpec("nf4", "int8", ffa_lora=True),
    "ffa-lora + nf4": CodecSpec("nf4", "nf4", ffa_lora=True),
}


def budget_table(
    shapes: Mapping[str, Shape] | None = None,
    specs: Mapping[str, CodecSpec] = TABLE_SPECS,
    rounds: int = 10,
    nodes_per_round: int = 2,
) -> str:
    """Markdown: codec → per-message MB and the run's MB (the reference configuration by default)."""
    shapes = shapes if shapes is not None else internlm3_8b_lora_shapes()
    reference = run_budget(shapes, CodecSpec(), rounds, nodes_per_round).total_bytes
    lines = [
        f"| codec (`comm.*`) | download MB / node | upload MB / node | {rounds}-round run MB | of fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, spec in specs.items():
        budget = run_budget(shapes, spec, rounds, nodes_per_round)
        lines.append(
            f"| {name} | {budget.down_bytes / MB:.2f} | {budget.up_bytes / MB:.2f} | "
            f"{budget.total_mb:.2f} | {budget.total_bytes / reference:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fedtune.codecs.budget: the docs table
    print(budget_table())
