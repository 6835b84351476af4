"""Left-padded batches score each question as it scores alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.embedded import EMBEDDED_MODEL
from fedtune.eval.data import load_mmlu
from fedtune.eval.loading import load_model
from fedtune.eval.scoring import choice_token_ids, format_prompt, score_questions


@pytest.mark.parametrize(("quantization", "tolerance"), [(0, 1e-3), (4, 0.5)])
def test_batched_equals_unbatched(smollm2_dir: Path, mmlu_dir: Path, quantization: int, tolerance: float):
    """Unquantised float32: the same logits whatever the batch. nf4 on CPU: bitsandbytes' kernels move a
    padded row's logits by about 0.1, so only closeness is asserted there."""
    questions, _ = load_mmlu(str(mmlu_dir), limit=1)
    tokenizer, model = load_model(EMBEDDED_MODEL, quantization, "float32", trust_remote_code=False)
    assert tokenizer.padding_side == "left"
    alone = score_questions(model, tokenizer, questions, batch_size=1, progress=False)
    batched = score_questions(model, tokenizer, questions, batch_size=5, progress=False)  # ragged last batch
    lengths = {len(tokenizer(format_prompt(q))["input_ids"]) for q in questions}
    assert len(lengths) > 3  # the batches really are padded
    for a, b in zip(alone, batched, strict=True):
        assert b.logits == pytest.approx(a.logits, abs=tolerance)
    if quantization == 0:
        assert [b.prediction for b in batched] == [a.prediction for a in alone]


def test_choice_tokens(smollm2_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = choice_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == [" A", " B", " C", " D"]
