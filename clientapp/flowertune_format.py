"""The FlowerTune template's prompt and loss mask (`train.prompt-format = "flowertune"`, the default).

The template (`examples/flowertune-llm-general-nlp`, dataset.py) trains on the Alpaca text

    Below is an instruction that describes a task. Write a response that appropriately completes the request.
    ### Instruction:
    {instruction}
    ### Response: {response}

tokenised whole with the tokenizer's special tokens, truncated to `train.seq-length`, no end-of-sequence
token appended, and trl's `DataCollatorForCompletionOnlyLM` masks the loss up to the end of the *last*
occurrence of the response tag's tokens (`tokenizer.encode("\\n### Response:", add_special_tokens=False)`
without its first two tokens); the pad token is the EOS token and the language-modeling collator masks every
EOS token too. A row whose tag was cut off by truncation trains on nothing there; here it is dropped (and
counted) instead of costing a step.

Here the rows arrive as fedtune's conversational prompt/completion (`fedtune.dataset`) and leave tokenised
(`input_ids` + `completion_mask`), which trl then uses as they are (no chat template, no added EOS).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_TAG = "\n### Response:"


def alpaca_text(instruction: str, response: str) -> str:
    return f"{PREAMBLE}\n### Instruction:\n{instruction}\n### Response: {response}"


def response_tag_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The template's tag tokens: the tag encoded alone, its first two tokens dropped (they encode the
    line break differently in context)."""
    return tokenizer.encode(RESPONSE_TAG, add_special_tokens=False)[2:]


def completion_mask(input_ids: list[int], tag: list[int], eos_id: int | None) -> list[int]:
    """1 where the template trains: after the last occurrence of `tag`, except EOS tokens; all 0 when the tag
    is absent."""
    end = None
    width = len(tag)
    if width:
        for i in range(len(input_ids) - width + 1):
            if input_ids[i : i + width] == tag:
                end = i + width
    if end is None:
        return [0] * len(input_ids)
    return [0] * end + [int(token != eos_id) for token in input_ids[end:]]


def _user_and_assistant(row: dict[str, Any]) -> tuple[str, str]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        return prompt, completion
    instruction = next(m["content"] for m in prompt if m["role"] == "user")
    response = next(m["content"] for m in completion if m["role"] == "assistant")
    return instruction, response


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, seq_length: int) -> tuple[Dataset, int]:
    """The rows as the template tokenises and masks them; returns (dataset, rows dropped for having no
    trained token)."""
    from datasets import Dataset as HFDataset

    tag = response_tag_ids(tokenizer)
    eos_id = tokenizer.eos_token_id
    rows, dropped = [], 0
    for row in dataset:
        instruction, response = _user_and_assistant(row)
        text = alpaca_text(instruction, response)
        ids = tokenizer(text, truncation=True, max_length=seq_length)["input_ids"]
        mask = completion_mask(ids, tag, eos_id)
        if not any(mask):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "completion_mask": mask})
    if dropped:
        log.warning(
            "%d rows have no response token within train.seq-length=%d (the template would train on "
            "nothing there): left out",
            dropped,
            seq_length,
        )
    if not rows:
        raise ValueError(f"no training row keeps a response token within train.seq-length={seq_length}")
    return HFDataset.from_list(rows), dropped
