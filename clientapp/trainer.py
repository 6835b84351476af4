"""One round of local training: trl's SFTTrainer on the node's data, for the configured steps."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.config import TrainSettings

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RoundOutcome:
    """What a round of local training produced, for the reply's MetricRecord."""

    train_loss: float
    steps: int
    seconds: float
    tokens: int  # real (non-padding) tokens seen
    peak_memory_bytes: int
    loss_history: tuple[float, ...]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sft_config(
    settings: TrainSettings, learning_rate: float, device: str, gradient_checkpointing: bool, output_dir: str
):  # -> SFTConfig (import kept lazy)
    from trl import SFTConfig

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
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        packing=settings.packing,
        padding_free=settings.packing,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def train_one_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: TrainSettings,
    learning_rate: float,
    device: str,
    gradient_checkpointing: bool,
) -> RoundOutcome:
    import torch
    from trl import SFTTrainer

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="fedtune-round-") as output_dir:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(settings, learning_rate, device, gradient_checkpointing, output_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
        history = tuple(
            float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry
        )
        tokens = int(trainer.state.num_input_tokens_seen)
    loss = float(result.training_loss)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}")
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else _cpu_peak_rss()
    return RoundOutcome(loss, int(result.global_step), seconds, tokens, peak, history)


def _cpu_peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
