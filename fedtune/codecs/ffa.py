"""FFA-LoRA (Sun et al., ICLR 2024): every node keeps the LoRA A matrices at the initial values drawn from the
run's seed (`train.seed`) and trains only B; only B crosses the network, in both directions.

The A values are `fedtune.model.initial_adapter_state(cfg.model, cfg.train.seed)` — the same function, seed
and model config the ServerApp builds its initial adapter from, so every party holds the same A without
sending it. Used by the trainer (clientapp/round.py); needs torch.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fedtune.codecs import is_lora_a

if TYPE_CHECKING:
    import torch

    from fedtune.config import ModelSettings

_SEEDED: dict[str, OrderedDict[str, torch.Tensor]] = {}  # (model settings, seed) -> A tensors


def seeded_a(settings: ModelSettings, seed: int) -> OrderedDict[str, torch.Tensor]:
    """The frozen A matrices of a run (computed once per process: a meta-device model, megabytes)."""
    key = json.dumps([asdict(settings), seed], sort_keys=True, default=str)
    if key not in _SEEDED:
        from fedtune.model import initial_adapter_state

        state = initial_adapter_state(settings, seed)
        _SEEDED[key] = OrderedDict((k, v) for k, v in state.items() if is_lora_a(k))
    return _SEEDED[key]


def with_seeded_a(
    received: OrderedDict[str, torch.Tensor], settings: ModelSettings, seed: int
) -> OrderedDict[str, torch.Tensor]:
    """The full adapter from the B matrices received and the seeded A matrices."""
    stray = [k for k in received if is_lora_a(k)]
    if stray:
        raise ValueError(f"FFA-LoRA: the global adapter must not carry A matrices (got {stray[0]!r})")
    return OrderedDict({**seeded_a(settings, seed), **received})


def b_only(state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in state.items() if not is_lora_a(k))


def set_a_trainable(model: Any, trainable: bool) -> None:
    """Freeze (FFA-LoRA) or unfreeze the A matrices; a model kept warm across runs may switch.

    On a k-bit model trl puts the trainable LoRA weights in bf16 (QLoRA's recipe) when the trainer is built; a
    frozen A is not touched by it, so it is put in bf16 here to match its B (the A values a node computes with
    are then the seeded ones rounded to bf16: relative error <= 2^-9)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantised = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(trainable)
            if not trainable and quantised and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
