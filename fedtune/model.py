"""Base model + LoRA adapter: loading (4-bit nf4 where asked), adapter state in and out of Flower records.

The base weights never travel: only the LoRA arrays do. The server builds the initial adapter from the
model's config on the meta device, so a CPU-only SuperLink host never needs the base weights.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.config import ModelSettings
from fedtune.embedded import resolve_model
from fedtune.packing import BF16_WIRE_DTYPE, Unpacked  # (bf16 bits travel as uint16)

if TYPE_CHECKING:  # heavy imports stay inside functions: the SuperLink/CLI start fast
    import torch
    from flwr.app import ArrayRecord
    from peft import LoraConfig, PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)



def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    log.warning("no CUDA device: training on the CPU (slow; fine for the embedded demo model)")
    return "cpu"


def compute_dtype(device: str) -> torch.dtype:
    """The dtype the weights load in (the non-quantised ones stay in it unless upcast)."""
    import torch

    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def lora_config(settings: ModelSettings) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=list(settings.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def hub_kwargs(settings: ModelSettings) -> dict[str, object]:
    """What every from_pretrained of the model gets: remote code only if configured, the pinned revision."""
    return {"trust_remote_code": settings.trust_remote_code, "revision": settings.revision or None}


def bnb_config(settings: ModelSettings):  # -> BitsAndBytesConfig | None (import kept lazy)
    """4-bit: `settings.quant_type` (fp4 = the template's `load_in_4bit=True` default) computing in
    `settings.compute_dtype`; 8-bit: int8; 0: none."""
    import torch
    from transformers import BitsAndBytesConfig

    if settings.quantization == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quant_type,
            bnb_4bit_compute_dtype=getattr(torch, settings.compute_dtype),
            bnb_4bit_use_double_quant=False,
        )
    if settings.quantization == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.name), **hub_kwargs(settings))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(settings: ModelSettings, device: str) -> PreTrainedModel:
    """The frozen base model, quantised on load (4: fp4/nf4, 8: int8) or plain (0). The weights load in
    bf16 (fp16 on a GPU without bf16), as the template's `torch_dtype=torch.bfloat16`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        resolve_model(settings.name),
        quantization_config=bnb_config(settings),
        dtype=compute_dtype(device),
        device_map={"": 0} if device == "cuda" else "cpu",
        **hub_kwargs(settings),
    )


def load_trainable_model(settings: ModelSettings, device: str) -> PeftModel:
    """Base model prepared for k-bit training with a fresh LoRA adapter attached."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base_model(settings, device)
    if settings.quantization:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return get_peft_model(model, lora_config(settings))


def initial_adapter_state(
    settings: ModelSettings, seed: int, model_config: PretrainedConfig | None = None
) -> OrderedDict[str, torch.Tensor]:
    """The LoRA adapter peft would initialise, built from the model config alone (meta device).

    Only the LoRA matrices are materialised (A: peft's Kaiming init under `seed`, B: zeros), so this
    costs megabytes even for an 8B model.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    config = model_config or AutoConfig.from_pretrained(resolve_model(settings.name), **hub_kwargs(settings))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
        model = get_peft_model(base, lora_config(settings))
    set_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.lora_A[adapter].to_empty(device="cpu")
                module.lora_B[adapter].to_empty(device="cpu")
                module.reset_lora_parameters(adapter, init_lora_weights=True)
    state = get_peft_model_state_dict(model)
    return OrderedDict((key, tensor.detach().float().contiguous()) for key, tensor in state.items())


def state_to_arrays(state: OrderedDict[str, torch.Tensor], transport_dtype: str) -> ArrayRecord:
    """Adapter tensors to a per-tensor Flower ArrayRecord in the transport dtype (float32 or bfloat16);
    the packed form and the conversions live in fedtune/packing.py."""
    from fedtune.packing import encode, per_tensor

    return per_tensor(encode(state, transport_dtype))


def arrays_to_state(arrays: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """A Flower ArrayRecord (packed or per-tensor; fp32, or bf16 carried as uint16) to float32 tensors."""
    import torch

    from fedtune.packing import decode, unpack

    values = decode(unpack(arrays).arrays)
    # a copy: the arrays are views into one received buffer, and torch wants writable memory it owns
    return OrderedDict((key, torch.from_numpy(np.array(v, dtype=np.float32))) for key, v in values.items())


# model -> {peft state-dict key: the Parameter behind it}; weak, so a reloaded model drops its entry
_ADAPTER_PARAMETERS: weakref.WeakKeyDictionary[Any, OrderedDict[str, torch.nn.Parameter] | None] = (
    weakref.WeakKeyDictionary()
)


def adapter_parameters(model: PeftModel) -> OrderedDict[str, torch.nn.Parameter] | None:
    """peft's adapter keys (its order) and the parameters they name, found once per model.

    `get_peft_model_state_dict` walks the whole model's `state_dict()` every call, and on a 4-bit base
    bitsandbytes packs every quantised layer's quant state for it: ~0.1-0.3 s per call on the 8B shape
    (H200 host) for a few hundred LoRA tensors, paid on the way in and out of every round. Its tensors share
    storage with the parameters, which is how each key finds its parameter here. None when one does not
    (a peft form that copies): the callers then go through peft each time."""
    if model in _ADAPTER_PARAMETERS:
        return _ADAPTER_PARAMETERS[model]
    from peft import get_peft_model_state_dict

    # (a meta-device model has no storage to tell its tensors apart: no map for it)
    by_storage = {p.data_ptr(): p for p in model.parameters() if p.device.type != "meta" and p.numel()}
    pairs = [
        (key, by_storage.get(tensor.data_ptr()) if tensor.device.type != "meta" else None, tensor.shape)
        for key, tensor in get_peft_model_state_dict(model).items()
    ]
    mappable = all(param is not None and param.shape == shape for _, param, shape in pairs)
    mappable = mappable and len({id(param) for _, param, _ in pairs}) == len(pairs)
    found = OrderedDict((key, param) for key, param, _ in pairs if param is not None) if mappable else None
    _ADAPTER_PARAMETERS[model] = found  # None too: the walk is not repeated for a model it cannot map
    return found


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """A snapshot of the adapter's tensors in float32 (trl may train them in bf16 on a quantised base).

    Always copies: with float32 compute the LoRA weights already are float32 CPU tensors, and
    `.float().cpu()` would hand back the live parameters, which the next training step changes in place."""
    import torch
    from peft import get_peft_model_state_dict

    params = adapter_parameters(model)
    state = params if params is not None else get_peft_model_state_dict(model)
    return OrderedDict(
        (key, tensor.detach().to("cpu", torch.float32, copy=True)) for key, tensor in state.items()
    )


# the transport dtypes as torch dtypes: a wire buffer is filled on the model's device
def _wire_torch_dtype(transport_dtype: str) -> torch.dtype:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if transport_dtype not in dtypes:
        raise ValueError(f"unknown transport dtype {transport_dtype!r}")
    return dtypes[transport_dtype]


def adapter_buffer(
    model: PeftModel, transport_dtype: str, keep: Callable[[str], bool] | None = None
) -> tuple[list[tuple[str, tuple[int, ...]]], np.ndarray] | None:
    """The adapter's tensors (those `keep` accepts) in the transport dtype, back to back in one new 1-D
    buffer, with their names and shapes in buffer order; bf16 as its bit patterns (uint16), as
    fedtune/packing.py's `encode` gives them (round to nearest even, exact from bf16 weights).

    The cast and the concatenation run where the weights are (the GPU), then one copy brings the buffer to the
    host: a few hundred small device-to-host copies, each waiting for the device, and the host-side encode
    and pack copies are what `adapter_state` + `encode` + `pack` cost. None without a parameter map."""
    import torch

    params = adapter_parameters(model)
    if params is None:
        return None
    wire = _wire_torch_dtype(transport_dtype)
    chosen = [(key, param) for key, param in params.items() if keep is None or keep(key)]
    on_one_device = len({param.device for _, param in chosen}) <= 1
    with torch.no_grad():
        parts = [param.detach().reshape(-1).to(wire) for _, param in chosen]
        if not on_one_device:  # (an offloaded model) concatenate on the host
            parts = [part.cpu() for part in parts]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=wire)
        host = flat.cpu()  # torch.cat made a new tensor: the buffer never aliases a live parameter
    values = host.numpy() if wire == torch.float32 else host.view(torch.int16).numpy().view(np.uint16)
    return [(key, tuple(param.shape)) for key, param in chosen], values


def load_adapter_buffers(model: PeftModel, unpacked: Unpacked) -> bool:
    """Write a packed adapter (float32, or bf16 bits) into the model from its received buffers: each buffer
    crosses to the device in one copy and is cut into the parameters there (each value copied in the
    parameter's dtype, as `load_adapter_state` does; the same checks of keys and shapes). False, having
    written nothing, where this path does not apply (no parameter map, a per-tensor record, other dtypes):
    the caller then decodes per tensor."""
    import warnings

    import torch

    params = adapter_parameters(model)
    wire_dtypes = {"float32", BF16_WIRE_DTYPE.name}
    if params is None or unpacked.form != "packed" or not set(unpacked.buffers) <= wire_dtypes:
        return False
    _check_adapter(params, {key: tuple(values.shape) for key, values in unpacked.arrays.items()})
    device = next(iter(params.values())).device if params else torch.device("cpu")
    with torch.no_grad(), warnings.catch_warnings():
        # the received buffers are read-only views of the message's bytes; torch only reads them here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        staged: dict[str, torch.Tensor] = {}
        for dtype_name, buffer in unpacked.buffers.items():
            if dtype_name == BF16_WIRE_DTYPE.name:
                staged[dtype_name] = torch.from_numpy(buffer.view(np.int16)).to(device).view(torch.bfloat16)
            else:
                staged[dtype_name] = torch.from_numpy(buffer).to(device)
        for entry in unpacked.entries:
            count = math.prod(entry["shape"])
            source = staged[entry["dtype"]][entry["offset"] : entry["offset"] + count]
            params[entry["name"]].copy_(source.view(entry["shape"]))
    return True


def _check_keys(expected: set[str], got: set[str]) -> None:
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(f"adapter keys differ from the model's: missing {missing[:3]}, extra {extra[:3]}")


def _check_adapter(params: Mapping[str, torch.nn.Parameter], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every key of the model's adapter, nothing else, each in the model's shape."""
    _check_keys(set(params), set(shapes))
    for key, shape in shapes.items():
        if tuple(shape) != tuple(params[key].shape):
            raise ValueError(
                f"adapter tensor {key}: shape {tuple(shape)}, the model's is {tuple(params[key].shape)}"
            )


def load_adapter_state(model: PeftModel, state: OrderedDict[str, torch.Tensor]) -> None:
    """Put global adapter weights into the model; every key and shape must match exactly. Each value is
    copied into its parameter in the parameter's dtype and device, as peft's `set_peft_model_state_dict`
    (`load_state_dict`) does."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    params = adapter_parameters(model)
    if params is None:
        _check_keys(set(get_peft_model_state_dict(model)), set(state))
        result: Any = set_peft_model_state_dict(model, state)  # a NamedTuple peft does not type
        if result.unexpected_keys:
            raise ValueError(f"unexpected adapter keys: {result.unexpected_keys[:3]}")
        return
    _check_adapter(params, {key: tuple(value.shape) for key, value in state.items()})
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
