"""What bench/communication.py measures of a global adapter: the held-out loss over completion tokens and
the FlowerTune-protocol MMLU sample score."""

from __future__ import annotations

from typing import Any


class HeldOut:
    """Mean loss over the completion tokens of the held-out rows (the prompt masked, as trl trains)."""

    def __init__(self, tokenizer: Any, rows: list[dict[str, str]], seq_length: int, batch: int = 16) -> None:
        import torch

        from fedtune.dataset import alpaca_to_conversation

        self.batches = []
        examples = []
        for row in rows:
            conv = alpaca_to_conversation(row)
            assert conv is not None
            prompt = tokenizer.apply_chat_template(conv["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(conv["prompt"] + conv["completion"], tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:seq_length]
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            examples.append((ids, labels[: len(ids)]))
        pad = tokenizer.pad_token_id
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (ids, lab) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                labels[i, : len(lab)] = torch.tensor(lab)
                mask[i, : len(ids)] = 1
            self.batches.append((input_ids, labels, mask))

    def loss(self, model: Any) -> float:
        import torch

        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            device = next(model.parameters()).device
            for input_ids, labels, mask in self.batches:
                input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
                shifted = labels[:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                    ignore_index=-100, reduction="sum",
                )
                total += float(losses)
                count += int((shifted != -100).sum())
        model.train(was_training)
        return total / count


def mmlu_sample(model: Any, tokenizer: Any) -> dict[str, float]:
    """FlowerTune-protocol accuracy on the embedded MMLU sample, per category and averaged."""
    from fedtune.eval import flowertune
    from fedtune.eval.data import load_mmlu
    from fedtune.eval.sample import EMBEDDED_MMLU

    questions, _ = load_mmlu(EMBEDDED_MMLU)
    model.eval()
    by_category = flowertune.evaluate_categories(model, tokenizer, questions)
    scores = {c: flowertune.accuracy(g) for c, g in by_category.items() if g}
    out = {c: float(v) for c, v in scores.items() if v is not None}
    out["all"] = float(flowertune.accuracy(flowertune.in_evaluator_order(by_category)) or 0.0)
    return out
