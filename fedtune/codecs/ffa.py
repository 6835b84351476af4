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

    Who casts which adapter weight to bf16 differs by path (trl puts the *trainable* LoRA weights of a k-bit
    model in bf16; a frozen A keeps its dtype), so while A is frozen each B casts its input to its own dtype
    (a forward pre-hook; the cast is differentiable)."""
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(trainable)
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if lora_b is None or not hasattr(lora_b, "values"):
            continue
        for linear in lora_b.values():
            handle = linear.__dict__.pop("_fedtune_ffa_hook", None)
            if handle is not None:
                handle.remove()
            if not trainable:
                hook = linear.register_forward_pre_hook(_input_to_weight_dtype)
                linear.__dict__["_fedtune_ffa_hook"] = hook


def _input_to_weight_dtype(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    first = args[0]
    if first.dtype != module.weight.dtype:
        return (first.to(module.weight.dtype), *args[1:])
    return args
