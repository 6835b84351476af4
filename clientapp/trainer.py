"""One round of local training: trl's SFTTrainer on the node's data, for the configured steps.

Speed levers (all off by default, so the defaults stay the FlowerTune reference; see docs/performance.md):
- `train.padding-free`: the micro-batch's samples are concatenated into one row (position ids restart per
  sample, attention stays within each sample), so micro-batch 4 × accumulation 1 trains on exactly the samples
  of the reference's 1 × 4 with the same token-weighted loss, in one forward/backward instead of four.
- `model.gradient-checkpointing-every`: checkpoint only every n-th decoder layer.
- `train.liger-kernel`: Liger's fused RMSNorm/RoPE/SwiGLU kernels (needs the liger-kernel package).
- `train.upcast-non-quantized = false`: norms, embeddings and LM head stay in bf16 instead of peft's fp32
  copy, so the residual stream, attention and LM head run in bf16.
- `train.compile-layers`: torch.compile each decoder layer (4-bit matmuls, LoRA branches, norms, RoPE), which
  fuses the many small kernels a layer launches from Python; the step is CPU launch-bound on a GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.config import TrainSettings

# With compiled layers, rows are padded to a multiple of this many tokens (labels -100; in a padding-free
# row each pad token is a sequence of its own): Triton kernels specialise on sizes divisible by 16, so
# unpadded lengths would keep compiling new variants.
COMPILE_PAD_MULTIPLE = 64


def pad_multiple(settings: TrainSettings) -> int | None:
    """What rows are padded to a multiple of: only for compiled layers."""
    return COMPILE_PAD_MULTIPLE if settings.compile_layers else None

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RoundOutcome:
    """What a round of local training produced, for the reply's MetricRecord."""

    train_loss: float
    steps: int
    seconds: float  # trainer.train() only
    tokens: int  # real (non-padding) tokens seen
    peak_memory_bytes: int
    loss_history: tuple[float, ...]
    setup_seconds: float = 0.0  # building the trainer (tokenising the data unless cached)
    step_seconds: tuple[float, ...] = ()  # wall time of each optimizer step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def uses_padding_free(settings: TrainSettings) -> bool:
    """trl's padding-free collator is on for BFD packing and for `train.padding-free`."""
    return settings.packing or settings.padding_free


def sft_config(
    settings: TrainSettings,
    learning_rate: float,
    device: str,
    gradient_checkpointing: bool,
    output_dir: str,
    checkpoint_every: int = 1,
    dataset_prepared: bool = False,
    compute_dtype: str = "bfloat16",
):  # -> SFTConfig (import kept lazy)
    """`compute_dtype` (see `model_compute_dtype`) decides mixed precision on a GPU: bf16/fp16 autocast, or
    none for float32 (the FlowerTune template's TrainingArguments leave bf16 and fp16 off)."""
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpoint_kwargs: dict[str, Any] | None = None
    if gradient_checkpointing:
        checkpoint_kwargs = {"use_reentrant": False}
        if checkpoint_every > 1:
            checkpoint_kwargs["every_n_layers"] = checkpoint_every
    # transformers >= 5.2x calls it activation checkpointing; older 5.x only know the gradient_ names
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    extra: dict[str, Any] = {
        f"{prefix}_checkpointing": gradient_checkpointing,
        f"{prefix}_checkpointing_kwargs": checkpoint_kwargs,
    }
    if settings.liger_kernel:
        extra["use_liger_kernel"] = True
    if dataset_prepared:  # already tokenised, truncated and labelled by trl in an earlier round
        extra["dataset_kwargs"] = {"skip_prepare_dataset": True}
    padding_free = uses_padding_free(settings)
    return SFTConfig(
        output_dir=output_dir,
        max_length=settings.seq_length,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        learning_rate=learning_rate,
        # The schedule is across rounds (server side); within a round the rate is constant.
        lr_scheduler_type="constant",
        optim=settings.optim,
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=device == "cuda" and compute_dtype == "bfloat16",
        fp16=device == "cuda" and compute_dtype == "float16",
        use_cpu=device == "cpu",
        packing=settings.packing,
        # Without packing, padding-free is switched on after trl has tokenised and truncated the data
        # (trl refuses padding_free + max_length without packing): see `train_one_round`.
        padding_free=settings.packing,
        completion_only_loss=True,
        # A padding-free row has no padding at all; a padded batch counts its attention mask.
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        pad_to_multiple_of=None if padding_free else pad_multiple(settings),
        **extra,
    )


def model_compute_dtype(model: Any) -> str:
    """The dtype a model's forward computes in: a 4-bit model's bnb compute dtype (model.compute-dtype),
    else bfloat16 (8-bit and unquantised models train with bf16 autocast on a GPU, as before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantization = getattr(base.config, "quantization_config", None)
    if getattr(base, "is_loaded_in_4bit", False) and quantization is not None:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
        if dtype is None and isinstance(quantization, dict):
            dtype = quantization.get("bnb_4bit_compute_dtype")
        name = str(dtype or "float32").removeprefix("torch.")
        return name
    return "bfloat16"


def keep_adapter_dtype(model: Any) -> dict[str, Any]:
    """The trainable (LoRA) tensors as they are now: trl casts them to bf16 when it wraps a quantised model
    (lossy), which the template (fp32 LoRA, no autocast) never does; `restore_adapter_dtype` undoes it."""
    return {name: p.data for name, p in model.named_parameters() if p.requires_grad}


def restore_adapter_dtype(model: Any, saved: dict[str, Any]) -> None:
    for name, param in model.named_parameters():
        if name in saved and param.dtype != saved[name].dtype:
            param.data = saved[name]


def set_non_quantized_dtype(model: PeftModel, dtype: Any) -> None:
    """On a k-bit model, put the frozen non-quantised weights (norms, embeddings, LM head) in `dtype`, or in
    the compute dtype (None). peft's prepare_model_for_kbit_training upcasts them to fp32; they were loaded
    in the compute dtype, so going back and forth is exact. A plain (unquantised) model is left alone."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        return
    if dtype is None:
        quantization = getattr(base.config, "quantization_config", None)
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    for name, param in base.named_parameters():
        if param.requires_grad or param.__class__.__name__ in {"Params4bit", "Int8Params"}:
            continue
        if ".lora_" in name:  # a frozen adapter weight (FFA-LoRA's A, issue 18) stays in its adapter's dtype
            continue
        if param.dtype in (torch.float32, torch.bfloat16, torch.float16) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated transformer blocks: the classes it names in `_no_split_modules` (every
    transformers model does, remote-code ones such as InternLM3 included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


_COMPILED_FORWARDS: dict[type, Any] = {}  # decoder layer class -> its compiled forward, shared by all layers


def _compiled_forward(layer_class: type[Any]) -> Any:
    import torch

    if layer_class not in _COMPILED_FORWARDS:
        # transformers >= 5 wraps a layer's forward to checkpoint it; compile what it wraps
        forward = getattr(layer_class.forward, "__wrapped__", layer_class.forward)
        _COMPILED_FORWARDS[layer_class] = torch.compile(forward, dynamic=True)
    return _COMPILED_FORWARDS[layer_class]


def _checkpointed_compiled_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward: compiled, and checkpointed (outside the compiled region) where transformers
    has switched checkpointing on for this layer (`model.gradient-checkpointing-every` decides which)."""
    import functools

    import torch

    compiled = _compiled_forward(type(self))
    if self.training:
        kwargs.pop("use_cache", None)  # no KV cache in training; the same kwargs for every layer: one graph
        if getattr(self, "gradient_checkpointing", False) and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
    return compiled(self, *args, **kwargs)


def set_layer_compile(model: Any, enabled: bool) -> None:
    """Compile (or stop compiling) each decoder layer's forward with torch.compile.

    Regional compilation: every layer runs one compiled function (forward and backward), so Dynamo compiles
    it once, not once per layer. Activation checkpointing stays outside the compiled region. Shapes are
    dynamic; rows are padded to `COMPILE_PAD_MULTIPLE` tokens so that a few compiled variants serve every
    length. A model kept warm across rounds keeps its compiled layers.
    """
    import types

    layers = decoder_layers(model)
    if enabled and not layers:
        raise ValueError("train.compile-layers: the model names no decoder layer class in _no_split_modules")
    for layer in layers:
        compiled = "forward" in layer.__dict__
        if enabled and not compiled:
            layer.forward = types.MethodType(_checkpointed_compiled_forward, layer)
        elif not enabled and compiled:
            del layer.forward  # back to the class's eager forward


class RealTokenCounter:
    """Wraps a collator; remembers each micro-batch's real (non-padding) token count in collation order, so
    the tokens of the batches the trainer consumed can be summed afterwards (the data loader may collate one
    batch ahead)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.counts: list[int] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.counts.append(sum(len(example["input_ids"]) for example in examples))
        return self.collator(examples)

    def tokens(self, micro_batches: int) -> int:
        return sum(self.counts[:micro_batches])


def _step_clock() -> Any:
    """A TrainerCallback recording the wall time of each optimizer step (class built lazily: no
    transformers import at module load)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.synchronize: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            self.synchronize = torch.cuda.synchronize if torch.cuda.is_available() else None
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            if self.synchronize is not None:
                self.synchronize()
            self.marks.append(time.perf_counter())

        def seconds(self) -> tuple[float, ...]:
            return tuple(b - a for a, b in zip(self.marks, self.marks[1:], strict=False))

    return StepClock()


def _forward_attributes(model: PeftModel) -> list[tuple[Any, Any]]:
    """Instance-level `forward` overrides (trl's fused LM head, accelerate's autocast wrapper) of the
    PEFT model and its base, so a model kept warm across rounds can be given back unpatched."""
    modules: list[Any] = [model]
    if hasattr(model, "get_base_model"):
        modules.append(model.get_base_model())
    return [(m, m.__dict__.get("forward", _MISSING)) for m in modules]


_MISSING = object()


def _restore_forward_attributes(saved: list[tuple[Any, Any]]) -> None:
    for module, forward in saved:
        if forward is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = forward


@dataclass
class RoundTrainer:
    """An SFTTrainer built over the model for one round, before its learning rate is known: a warm trainer
    builds the next round's between rounds (clientapp/round.py `prepare_next_round`), so a round does not
    pay the ~0.2 s of building it. `run_round_trainer` trains it once; it is not reused."""

    trainer: Any
    clock: Any
    counter: RealTokenCounter | None
    settings: TrainSettings
    device: str
    setup_seconds: float
    output_dir: tempfile.TemporaryDirectory[str]
    saved_forwards: list[tuple[Any, Any]]
    key: str = ""  # what it was built for (clientapp.round.trainer_key): used only if the round matches

    def discard(self) -> None:
        """Give the model back as it was (no trainer patches) and remove the output folder."""
        _restore_forward_attributes(self.saved_forwards)
        self.output_dir.cleanup()


def build_round_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: TrainSettings,
    device: str,
    gradient_checkpointing: bool,
    checkpoint_every: int = 1,
    prepared: dict[str, Any] | None = None,
    learning_rate: float = 0.0,
) -> RoundTrainer:
    """Everything before `trainer.train()`: the model's per-round settings, the (cached) tokenised data, the
    SFTTrainer. `learning_rate` may be set later (`run_round_trainer`): the optimizer is built in train().
    `prepared` (optional, kept by a warm trainer across rounds) caches the tokenised dataset so later rounds
    skip tokenisation."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    set_non_quantized_dtype(model, torch.float32 if settings.upcast_non_quantized else None)
    set_layer_compile(model, settings.compile_layers)
    if not gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
        # a model kept across rounds may have been prepared with checkpointing on
        disable = (
            getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        )
        disable()
    cache_key = (getattr(dataset, "_fingerprint", id(dataset)), settings.seq_length, id(tokenizer))
    train_dataset = dataset
    dataset_prepared = prepared is not None and not settings.packing and prepared.get("key") == cache_key
    if dataset_prepared:
        assert prepared is not None  # dataset_prepared says so
        train_dataset = prepared["dataset"]
    elif settings.prompt_format == "flowertune":
        from clientapp.flowertune_format import tokenize

        train_dataset, _ = tokenize(dataset, tokenizer, settings.seq_length)
    saved_forwards = _forward_attributes(model)
    clock = _step_clock()
    compute = model_compute_dtype(model)
    # float32 compute (the template): LoRA weights stay float32 through trl's QLoRA bf16 cast
    saved_adapter = keep_adapter_dtype(model) if compute == "float32" else None
    output_dir = tempfile.TemporaryDirectory(prefix="fedtune-round-")
    try:
        setup_started = time.perf_counter()
        trainer = SFTTrainer(
            model=model,
            args=sft_config(
                settings,
                learning_rate,
                device,
                gradient_checkpointing,
                output_dir.name,
                checkpoint_every,
                dataset_prepared,
                compute,
            ),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        # transformers prints a raw dict per logged step to stdout, which breaks the SuperNode's
        # JSON log lines; the losses reach the server in the reply's metrics instead.
        trainer.remove_callback(PrinterCallback)
        if saved_adapter is not None:  # before train() builds the optimizer over these tensors
            restore_adapter_dtype(model, saved_adapter)
        counter = None
        if settings.padding_free and not settings.packing:
            # trl has tokenised and truncated to max_length; now concatenate each micro-batch.
            counter = RealTokenCounter(
                DataCollatorForLanguageModeling(
                    pad_token_id=tokenizer.pad_token_id,
                    padding_free=True,
                    pad_to_multiple_of=pad_multiple(settings),
                )
            )
            trainer.data_collator = counter
        if prepared is not None and not settings.packing:
            prepared.update(key=cache_key, dataset=trainer.train_dataset)
        setup_seconds = time.perf_counter() - setup_started
    except BaseException:
        _restore_forward_attributes(saved_forwards)
        output_dir.cleanup()
        raise
    return RoundTrainer(trainer, clock, counter, settings, device, setup_seconds, output_dir, saved_forwards)


def run_round_trainer(built: RoundTrainer, learning_rate: float) -> RoundOutcome:
    """Train a built trainer at the round's learning rate, once; the model is given back unpatched."""
    import torch

    trainer, settings = built.trainer, built.settings
    try:
        # read when train() builds the optimizer and the (constant) schedule
        trainer.args.learning_rate = learning_rate
        if built.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        # What is alive now (model, tokenizer, dataset: millions of objects) outlives the round; frozen,
        # the cyclic collector stops rescanning it mid-step.
        gc.freeze()
        try:
            result = trainer.train()
        finally:
            gc.unfreeze()
        seconds = time.perf_counter() - started
        history = tuple(float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
        tokens = int(trainer.state.num_input_tokens_seen)
        if built.counter is not None:  # exact even when the row was padded for compiled layers
            tokens = built.counter.tokens(result.global_step * settings.gradient_accumulation_steps)
    finally:
        built.discard()
    loss = float(result.training_loss)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}")
    peak = int(torch.cuda.max_memory_allocated()) if built.device == "cuda" else _cpu_peak_rss()
    steps, step_seconds = int(result.global_step), built.clock.seconds()
    return RoundOutcome(loss, steps, seconds, tokens, peak, history, built.setup_seconds, step_seconds)


def train_one_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: TrainSettings,
    learning_rate: float,
    device: str,
    gradient_checkpointing: bool,
    checkpoint_every: int = 1,
    prepared: dict[str, Any] | None = None,
) -> RoundOutcome:
    """Build the round's trainer and train it: `build_round_trainer` then `run_round_trainer`."""
    built = build_round_trainer(
        model, tokenizer, dataset, settings, device, gradient_checkpointing, checkpoint_every, prepared,
        learning_rate,
    )
    return run_round_trainer(built, learning_rate)


def _cpu_peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
