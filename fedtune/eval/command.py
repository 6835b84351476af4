"""`fedtune eval`: MMLU by FlowerTune categories for a saved adapter (and the base model without it),
with the run's communication budget, as a results JSON and the reference submission's Markdown table."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.atomic import write_json
from fedtune.errors import FedTuneError

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
RESULTS_JSON = "mmlu_results.json"
TABLE_MD = "mmlu_table.md"
BASE_LABEL = "base"
SCORING = "zero-shot; next-token logits over ' A'/' B'/' C'/' D' after 'Answer:' (lm-eval's mmlu prompt)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", required=True, help="a PEFT adapter folder (adapter_config.json + weights)"
    )
    parser.add_argument(
        "--base-model",
        help="base model id or folder (default: the adapter's base_model_name_or_path; "
        "the embedded alias embedded/smollm2-135m-instruct works offline)",
    )
    parser.add_argument(
        "--mmlu",
        help="local MMLU test data: a folder of <subject>_test.csv files (MMLU tarball layout data/test/) "
        "or parquet/JSON(L) with question/choices/answer/subject; embedded/mmlu-sample: a tiny sample of "
        "our own questions (smoke test, not MMLU); default: the hub dataset cais/mmlu",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--quantization",
        type=int,
        choices=(0, 4, 8),
        default=4,
        help="load the base model in nf4 (4, as in training), int8 (8) or unquantised (0)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (auto: as in training, bfloat16 where supported)",
    )
    parser.add_argument("--no-base", action="store_true", help="skip the base model without the adapter")
    parser.add_argument(
        "--results",
        help="the run's results.json (for the communication budget); "
        "default: found next to the adapter when it sits in a run folder",
    )
    parser.add_argument(
        "--out", help="output folder (default: <run folder>/eval, or ./fedtune-eval/<adapter>)"
    )
    parser.add_argument(
        "--label", help="table row name of the adapter (default: 'fedtune (<adapter folder>)')"
    )
    parser.add_argument("--limit", type=int, help="at most N questions per subject (quick runs)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="prompt tokens kept (left-truncated; 2048)"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow model code from the hub (default: the run's setting, else off)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser(prog: str = "fedtune eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return parser


def adapter_base_model(adapter: Path) -> str:
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise FedTuneError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        name = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except ValueError as err:
        raise FedTuneError(f"{config_path}: not valid JSON ({err})") from None
    if not name:
        raise FedTuneError(f"{config_path} names no base_model_name_or_path: pass --base-model")
    return str(name)


def load_model(name: str, quantization: int, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """Tokenizer (left padding) and the frozen base model, quantised as in training."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedtune.config import ModelSettings
    from fedtune.embedded import resolve_model
    from fedtune.model import compute_dtype, load_base_model, load_tokenizer, pick_device

    settings = ModelSettings(name=name, trust_remote_code=trust_remote_code, quantization=quantization)
    try:
        tokenizer = load_tokenizer(settings)
        device = pick_device()
        if dtype == "auto":
            model = load_base_model(settings, device)  # the training loader, unchanged
        else:
            torch_dtype = getattr(torch, dtype)
            quant = None
            if quantization == 4:
                quant = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=torch_dtype,
                    bnb_4bit_use_double_quant=False,
                )
            elif quantization == 8:
                quant = BitsAndBytesConfig(load_in_8bit=True)
            model = AutoModelForCausalLM.from_pretrained(
                resolve_model(name),
                quantization_config=quant,
                dtype=torch_dtype,
                device_map={"": 0} if device == "cuda" else "cpu",
                trust_remote_code=trust_remote_code,
            )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedTuneError(f"cannot load base model {name!r}: {first}") from None
    tokenizer.padding_side = "left"
    model.eval()
    log.info(
        "base model %s: quantization %s, dtype %s",
        name,
        quantization,
        dtype if dtype != "auto" else compute_dtype(device),
    )
    return tokenizer, model


def attach_adapter(model: Any, adapter: Path) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedTuneError(f"--adapter {adapter}: cannot load it onto the base model ({first})") from None
    peft_model.eval()
    return peft_model


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation; returns the results payload (also written to --out)."""
    from fedtune.eval.data import load_mmlu
    from fedtune.eval.report import find_run_results, read_budget, render_table, summarize
    from fedtune.eval.scoring import DEFAULT_MAX_LENGTH, format_prompt, score_questions

    adapter = Path(args.adapter).expanduser()
    if not adapter.is_dir():
        raise FedTuneError(f"--adapter {args.adapter}: no such folder")
    base_model = args.base_model or adapter_base_model(adapter)
    if args.batch_size < 1:
        raise FedTuneError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise FedTuneError(f"--limit {args.limit}: must be at least 1")
    max_length = args.max_length or DEFAULT_MAX_LENGTH

    results_path = Path(args.results).expanduser() if args.results else find_run_results(adapter)
    budget_mb, run = read_budget(results_path) if results_path else (None, {})
    trust_remote_code = args.trust_remote_code
    if trust_remote_code is None:
        trust_remote_code = bool(run.get("config", {}).get("model", {}).get("trust_remote_code", False))

    questions, source = load_mmlu(args.mmlu, args.limit)  # data first: a bad path fails before the model
    out = (
        Path(args.out).expanduser()
        if args.out
        else (results_path.parent / "eval" if results_path else Path("fedtune-eval") / adapter.resolve().name)
    )
    label = args.label or f"fedtune ({adapter.resolve().name})"
    print(f"MMLU: {len(questions)} questions from {source}", file=sys.stderr)

    started = time.monotonic()
    tokenizer, model = load_model(base_model, args.quantization, args.dtype, trust_remote_code)
    model = attach_adapter(model, adapter)
    runs: list[tuple[str, Any]] = []
    score = dict(batch_size=args.batch_size, max_length=max_length, progress=not args.no_progress)
    if not args.no_base:
        with model.disable_adapter():
            runs.append((BASE_LABEL, score_questions(model, tokenizer, questions, desc=BASE_LABEL, **score)))
    runs.append((label, score_questions(model, tokenizer, questions, desc=label, **score)))

    methods = [(name, summarize(questions, [s.prediction for s in scored])) for name, scored in runs]
    table = render_table(methods, budget_mb)
    payload = {
        "benchmark": "mmlu",
        "mmlu_source": source,
        "num_questions": len(questions),
        "scoring": SCORING,
        "base_model": base_model,
        "adapter": str(adapter.resolve()),
        "quantization": args.quantization,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_length": max_length,
        "run_results": str(results_path.resolve()) if results_path else None,
        "budget_mb": budget_mb,
        "seconds": round(time.monotonic() - started, 2),
        "methods": [{"name": name, **summary} for name, summary in methods],
        "table": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    slugs = ["adapter"] if args.no_base else ["base", "adapter"]
    for (name, scored), slug in zip(runs, slugs, strict=True):
        with open(out / f"predictions-{slug}.jsonl", "w", encoding="utf-8") as handle:
            for q, s in zip(questions, scored, strict=True):
                handle.write(
                    json.dumps(
                        {
                            "method": name,
                            "subject": q.subject,
                            "prompt": format_prompt(q),
                            "answer": q.answer,
                            "prediction": s.prediction,
                            "logits": list(s.logits),
                        }
                    )
                    + "\n"
                )
    write_json(out / RESULTS_JSON, payload)
    (out / TABLE_MD).write_text(table)
    payload["out"] = str(out)
    return payload


def run(args: argparse.Namespace) -> int:
    payload = evaluate(args)
    print(payload["table"], end="")
    print(f"results: {Path(payload['out']) / RESULTS_JSON}", file=sys.stderr)
    return 0
