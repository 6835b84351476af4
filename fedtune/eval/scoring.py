"""Zero-shot multiple choice by next-token logits, as lm-eval's `mmlu` tasks score it.

Prompt (lm-eval's MMLU template, no chat template, no few-shot examples):

    The following are multiple choice questions (with answers) about <subject with spaces>.

    <question>
    A. <choice>
    B. <choice>
    C. <choice>
    D. <choice>
    Answer:

The prediction is the letter among " A"/" B"/" C"/" D" with the highest next-token logit (ties: the first).
Batches are left-padded with explicit position ids, so a padded row scores as it would alone; prompts are
sorted by length (longest first: an out-of-memory shows at once) and the results put back in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.errors import FedTuneError
from fedtune.eval.data import LETTERS, Question

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default context; longer prompts lose their start


def format_prompt(q: Question) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    subject = q.subject.replace("_", " ")
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{q.question.strip()}{options}\nAnswer:"
    )


def choice_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token id of " A" .. " D" as they follow "Answer:" (the continuation lm-eval scores)."""
    context = tokenizer.encode("Answer:", add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        whole = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        extra = whole[len(context) :]
        if whole[: len(context)] != context or len(extra) != 1:
            raise FedTuneError(
                f"the tokenizer does not encode ' {letter}' after 'Answer:' as one token "
                "(next-token scoring needs it)"
            )
        ids.append(extra[0])
    if len(set(ids)) != 4:
        raise FedTuneError("the tokenizer maps two answer letters to the same token")
    return ids


@dataclass(frozen=True)
class Scored:
    prediction: int  # 0-3
    logits: tuple[float, float, float, float]  # next-token logits of " A" .. " D"


def score_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    desc: str = "MMLU",
    progress: bool = True,
) -> list[Scored]:
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise FedTuneError(f"--batch-size {batch_size}: must be at least 1")
    letter_ids = choice_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # masked out anyway
    encoded = [tokenizer(format_prompt(q))["input_ids"][-max_length:] for q in questions]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    results: list[Scored | None] = [None] * len(encoded)
    state = {"logits_to_keep": True}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = _last_logits(
                model, input_ids.to(device), attention.to(device), positions.to(device), state
            )
            chosen = logits[:, letter_ids].float().cpu()
            for row, i in enumerate(batch):
                values = chosen[row]
                results[i] = Scored(int(values.argmax()), tuple(float(v) for v in values))  # type: ignore[arg-type]
    return results  # type: ignore[return-value]


def _last_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    state: dict[str, bool],
) -> torch.Tensor:
    """Logits at the last position; only that position is computed where the model allows it."""
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": positions,
        "use_cache": False,
    }
    if state["logits_to_keep"]:
        try:
            return model(**kwargs, logits_to_keep=1).logits[:, -1, :]
        except TypeError:  # a remote-code model without logits_to_keep
            state["logits_to_keep"] = False
    return model(**kwargs).logits[:, -1, :]
