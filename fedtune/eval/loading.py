"""The models `fedtune eval` scores: the frozen base model (the protocol's load settings) and a saved PEFT
adapter on it, checked tensor by tensor against the base model so a mismatched adapter is an error, not a
score."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fedtune.errors import FedTuneError

log = logging.getLogger(__name__)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(
    name: str,
    quantization: int,
    dtype: str,
    trust_remote_code: bool,
    revision: str | None = None,
    protocol: str = "lm-eval",
) -> tuple[Any, Any]:
    """Tokenizer and frozen base model. flowertune: the evaluator's from_pretrained settings; lm-eval:
    training's loader (dtype auto) or the given compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.config import ModelSettings
    from fedtune.embedded import resolve_model
    from fedtune.eval.flowertune import load_settings
    from fedtune.model import bnb_config, load_base_model, load_tokenizer, pick_device

    device = pick_device()
    device_map: Any = {"": 0} if device == "cuda" else "cpu"
    hub = {"trust_remote_code": trust_remote_code, "revision": revision or None}
    model: Any  # transformers' Auto* classes and fedtune.model's loaders type them differently
    tokenizer: Any
    try:
        if protocol == "flowertune":
            settings = load_settings(quantization)
            path = resolve_model(name)
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **settings, **hub)
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)  # as the evaluator: no padding changes
        else:
            model_settings = ModelSettings(
                name=name,
                trust_remote_code=trust_remote_code,
                quantization=quantization,
                revision=revision or "",
            )
            tokenizer = load_tokenizer(model_settings)
            if dtype == "auto":
                model = load_base_model(model_settings, device)  # the training loader, unchanged
            else:
                # training's quantisation, computing in the dtype asked for
                quant = bnb_config(dataclasses.replace(model_settings, compute_dtype=dtype))
                model = AutoModelForCausalLM.from_pretrained(
                    resolve_model(name),
                    quantization_config=quant,
                    dtype=getattr(torch, dtype),
                    device_map=device_map,
                    **hub,
                )
            tokenizer.padding_side = "left"
    except OSError as err:
        raise FedTuneError(f"cannot load base model {name!r}: {first_line(err)}") from None
    model.eval()
    log.info("base model %s (%s protocol): quantization %s, dtype %s", name, protocol, quantization, dtype)
    return tokenizer, model


def saved_adapter_keys(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the adapter's weights file."""
    safetensors = adapter / "adapter_model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as err:  # a truncated or foreign file
            raise FedTuneError(
                f"--adapter {adapter}: unreadable {safetensors.name} ({first_line(err)})"
            ) from None
    binary = adapter / "adapter_model.bin"
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise FedTuneError(f"--adapter {adapter}: no adapter_model.safetensors (or .bin)")


def attach_adapter(model: Any, adapter: Path) -> Any:
    """The adapter on the base model; every saved tensor must land on a module of the base model with its
    shape, and every LoRA tensor the model then has must come from the file (else: an error, not a score)."""
    from peft import PeftModel, get_peft_model_state_dict

    saved = saved_adapter_keys(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise FedTuneError(
            f"--adapter {adapter}: cannot load it onto the base model ({first_line(err)})"
        ) from None
    loaded = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(peft_model).items()}
    missing = sorted(set(loaded) - set(saved))
    extra = sorted(set(saved) - set(loaded))
    if missing or extra:
        raise FedTuneError(
            f"--adapter {adapter}: its tensors do not match the base model ({len(extra)} in the file fit no "
            f"module, e.g. {extra[:1]}; {len(missing)} the model expects are missing, e.g. {missing[:1]}): "
            "is it an adapter of this base model?"
        )
    wrong = sorted(key for key in saved if saved[key] != loaded[key])
    if wrong:
        raise FedTuneError(
            f"--adapter {adapter}: {wrong[0]} has shape {saved[wrong[0]]}, the base model's is "
            f"{loaded[wrong[0]]}: is it an adapter of this base model?"
        )
    peft_model.eval()
    return peft_model
