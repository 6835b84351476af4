"""The FlowerTune General-NLP leaderboard's MMLU protocol, reproduced step by step.

What the leaderboard's evaluator (`benchmarks/flowertune-llm/evaluation/general-nlp/` of flwrlabs/flower:
`eval.py`, `benchmarks.py`, `utils.py`) does, and so what this module does:

- Data: per category, the subjects in the evaluator's own order (`fedtune.eval.categories`, checked equal),
  each subject's test rows in file order (`lukaemon/mmlu`: columns input, A, B, C, D, target).
- Prompt: `Answer the following multiple choice question.\\nQuestion: {q}` — a `?` appended when q
  ends in neither `?` nor `.` — `\\n\\nOptions:\\nA. …\\nB. …\\nC. …\\nD. …\\nThe answer is:\\n`,
  wrapped in the literal string `<|im_start|>question\\n{prompt}<|im_end|>\\n<|im_start|>answer\\n` (not
  the tokenizer's chat template) and encoded with the tokenizer's default special tokens, one prompt at
  a time: no padding, no truncation.
- Generation: greedy (`do_sample=False, top_p=1.0, temperature=1.0, pad_token_id=eos`), `max_new_tokens` =
  the token count of the gold letter of the *first question of each batch* (`--batch-size`, 16 by default:
  the batch only groups prompts for that count and for the progress bar; prompts are never batched). The
  generated tokens are decoded with special tokens skipped.
- Outputs are stored per distinct prompt text: a prompt asked twice in a category keeps the last answer for
  both rows (the evaluator assigns by `prompt ==` over the whole table).
- Scoring (`format_answer`): lower-case output and gold; if the output holds `\\n##`, keep what follows the
  first one up to the next newline; non-alphanumerics to spaces, spaces collapsed, stripped; the first
  character; it counts as a prediction only if it is one of a, b, c, d, e, yes, no — otherwise the whole
  lower-cased output is compared with the gold letter. Accuracy = share of predictions equal to the gold.
- Artefacts: `acc_mmlu_<category>_<run>.txt` (`Accuracy: {acc}. `) and
  `generation_mmlu_<category>_<run>.jsonl` (one JSON array of {prompt, gold, subset, output}, as pandas'
  `to_json(orient="records")` writes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fedtune.eval.categories import CATEGORIES, SUBJECTS_BY_CATEGORY
from fedtune.eval.data import LETTERS, Question

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTRUCTION = "Answer the following multiple choice question."
WRAPPER = "<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"
# the evaluator's --category names
CATEGORY_SLUG = {
    "STEM": "stem",
    "Social Sciences": "social_sciences",
    "Humanities": "humanities",
    "Other": "other",
}
VALID_PREDICTIONS = ("a", "b", "c", "d", "e", "yes", "no")
DEFAULT_BATCH_SIZE = 16
DEFAULT_RUN_NAME = "fl"


def format_example(question: str, choices: Sequence[str]) -> str:
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(choices))
    return f"Question: {question}\n\nOptions:\n{options}"


def build_prompt(q: Question) -> str:
    """The prompt before the wrapper (the generations file's `prompt`)."""
    return f"{INSTRUCTION}\n{format_example(q.question, q.choices)}\nThe answer is:\n"


def wrap(prompt: str) -> str:
    return WRAPPER.format(prompt=prompt)


def format_answer(output_full: str, answer: str) -> tuple[str, str]:
    """(prediction, gold) as the evaluator's `format_answer(..., answer_type="mcq")` returns them; both
    arguments already lower-cased."""
    output = output_full
    default = (output_full, answer)
    if "\n##" in output:
        # what follows the first "\n##", up to the next line break
        output = output.split("\n##")[1].split("\n")[0].strip().lower()
    if "###" in answer:
        parts = answer.split("answer is:")
        if len(parts) < 2:
            return default
        answer = parts[1].split("###")[0].strip()
    output = re.sub(r"[^a-zA-Z0-9]", " ", output).strip()
    output = re.sub(" +", " ", output)
    output = output.encode("ascii", "ignore").decode("ascii")
    if output:
        output = output[0]
    if output in VALID_PREDICTIONS:
        return output, answer
    return default


def is_correct(output: str, gold: str) -> bool:
    prediction, answer = format_answer(output.lower(), gold.lower())
    return prediction == answer


@dataclass(frozen=True)
class Generated:
    question: Question
    prompt: str  # before the wrapper
    gold: str  # the answer letter
    output: str  # the decoded generation

    @property
    def correct(self) -> bool:
        return is_correct(self.output, self.gold)

    def record(self) -> dict[str, str]:
        subset = self.question.subject
        return {"prompt": self.prompt, "gold": self.gold, "subset": subset, "output": self.output}


def category_questions(questions: Sequence[Question], category: str) -> list[Question]:
    """The category's questions in the evaluator's order: its subject list, file order within a subject."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    return [q for subject in SUBJECTS_BY_CATEGORY[category] for q in by_subject.get(subject, [])]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_question: Callable[[], None] | None = None,
) -> list[Generated]:
    """One greedy generation per prompt, in order; see the module docstring for every rule."""
    import torch

    device = next(model.parameters()).device
    prompts = [build_prompt(q) for q in questions]
    golds = [LETTERS[q.answer] for q in questions]
    by_prompt: dict[str, str] = {}
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            batch = range(start, min(start + batch_size, len(questions)))
            max_new_tokens = len(tokenizer(golds[start], add_special_tokens=False)["input_ids"])
            for i in batch:
                input_ids = tokenizer.encode(wrap(prompts[i]), return_tensors="pt").to(device)
                output_ids = cast(Any, model).generate(
                    inputs=input_ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    top_p=1.0,
                    temperature=1.0,
                    pad_token_id=tokenizer.eos_token_id,
                )
                by_prompt[prompts[i]] = cast(str, tokenizer.decode(
                    output_ids[0][len(input_ids[0]) :], skip_special_tokens=True
                ))
                if on_question is not None:
                    on_question()
    return [Generated(q, p, g, by_prompt[p]) for q, p, g in zip(questions, prompts, golds, strict=True)]


def accuracy(generated: Sequence[Generated]) -> float | None:
    if not generated:
        return None
    return sum(g.correct for g in generated) / len(generated)


def predictions(generated: Sequence[Generated]) -> list[int]:
    """Per question: the predicted letter's index, or -1 where the output is not a letter a-d (never
    correct), for the shared summary of `fedtune.eval.report`."""
    out = []
    for g in generated:
        prediction, _ = format_answer(g.output.lower(), g.gold.lower())
        out.append("abcd".index(prediction) if prediction in ("a", "b", "c", "d") else -1)
    return out


def accuracy_text(value: float) -> str:
    return f"Accuracy: {value}. "


def generations_json(generated: Sequence[Generated]) -> str:
    """The generations file as pandas' `DataFrame.to_json(orient="records")` writes it: one compact JSON
    array, non-ASCII escaped, `/` escaped as `\\/`."""
    text = json.dumps([g.record() for g in generated], ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/")


def write_artefacts(out: Path, run_name: str, by_category: dict[str, list[Generated]]) -> list[Path]:
    """The evaluator's files for each category that has questions."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for category in CATEGORIES:
        generated = by_category.get(category) or []
        if not generated:
            continue
        slug = CATEGORY_SLUG[category]
        acc = out / f"acc_mmlu_{slug}_{run_name}.txt"
        acc.write_text(accuracy_text(accuracy(generated)), encoding="utf-8")  # type: ignore[arg-type]
        gen = out / f"generation_mmlu_{slug}_{run_name}.jsonl"
        gen.write_text(generations_json(generated), encoding="utf-8")
        written += [acc, gen]
    return written


def evaluate_categories(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_question: Callable[[], None] | None = None,
) -> dict[str, list[Generated]]:
    """Each category run separately, as `eval.py --category=stem,social_sciences,humanities,other` does
    (the batches restart at every category)."""
    return {
        category: generate(model, tokenizer, category_questions(questions, category), batch_size, on_question)
        for category in CATEGORIES
    }


def in_evaluator_order(by_category: dict[str, list[Generated]]) -> list[Generated]:
    return [g for category in CATEGORIES for g in by_category.get(category, [])]


def load_settings(quantization: int) -> dict[str, Any]:
    """from_pretrained arguments of the evaluator: 4-bit = `BitsAndBytesConfig(load_in_4bit=True)` (fp4,
    float32 compute) with float32 weights; 8-bit = int8 with float16; nothing else."""
    import torch
    from transformers import BitsAndBytesConfig

    from fedtune.errors import FedTuneError

    if quantization == 4:
        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True), "dtype": torch.float32}
    if quantization == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": torch.float16}
    raise FedTuneError(
        f"--quantization {quantization}: the FlowerTune evaluator loads the base model in 4 or 8 bits only "
        "(the leaderboard needs 4); use --protocol lm-eval for an unquantised model"
    )
