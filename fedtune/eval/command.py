"""`fedtune eval`: MMLU by FlowerTune categories for a saved adapter (and the base model without it), with
the run's communication budget, as a results JSON and the reference submission's Markdown table.

Two protocols:
- `flowertune` (default): the FlowerTune leaderboard's own evaluator, reproduced exactly
  (`fedtune/eval/flowertune.py`): greedy generation of the answer letter, its load settings, its artefacts.
- `lm-eval`: zero-shot letter logits with lm-eval's MMLU prompt (`fedtune/eval/scoring.py`). Not the
  leaderboard's numbers.

Nothing in a data file decides what code runs: `--trust-remote-code` and the base model come from flags
only (`--base-from-adapter` is the explicit consent to use the adapter's `base_model_name_or_path`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.atomic import write_json
from fedtune.errors import FedTuneError
from fedtune.eval.arguments import add_arguments, check_arguments, choose_base_model
from fedtune.eval.loading import attach_adapter, load_model

RESULTS_JSON = "mmlu_results.json"
TABLE_MD = "mmlu_table.md"
BASE_LABEL = "base"
TITLES = {
    "flowertune": "MMLU · FlowerTune protocol (the leaderboard's evaluator)",
    "lm-eval": "MMLU · lm-eval protocol (letter logits): not leaderboard numbers",
}
SCORING = {
    "flowertune": (
        "FlowerTune General-NLP evaluator: greedy generation of the answer letter after "
        "'Answer the following multiple choice question.' in an <|im_start|>question/answer wrapper; "
        "first character of the cleaned output"
    ),
    "lm-eval": (
        "zero-shot; next-token logits over ' A'/' B'/' C'/' D' after 'Answer:' (lm-eval's mmlu prompt)"
    ),
}


def build_parser(prog: str = "fedtune eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return parser


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _run_flowertune(
    model: Any, tokenizer: Any, questions: list[Any], batch_size: int, desc: str, progress: bool
) -> dict[str, list[Any]]:
    from fedtune.eval.flowertune import evaluate_categories

    with _progress(len(questions), desc, progress) as bar:
        return evaluate_categories(model, tokenizer, questions, batch_size, on_question=bar.update)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation; returns the results payload (also written to --out)."""
    from fedtune.eval import flowertune
    from fedtune.eval.data import HUB_DATASET, LUKAEMON_DATASET, load_mmlu_with_layout
    from fedtune.eval.report import find_run_results, read_budget, render_table, summarize
    from fedtune.eval.scoring import DEFAULT_MAX_LENGTH, format_prompt, score_questions

    protocol = args.protocol
    adapter = Path(args.adapter).expanduser() if args.adapter else None
    if adapter is not None and not adapter.is_dir():
        raise FedTuneError(f"--adapter {args.adapter}: no such folder")
    base_model = choose_base_model(args, adapter)
    check_arguments(args)
    max_length = args.max_length or DEFAULT_MAX_LENGTH

    results_path = Path(args.results).expanduser() if args.results else None
    if results_path is None and adapter is not None:
        results_path = find_run_results(adapter)
    budget_mb, run = read_budget(results_path) if results_path else (None, {})
    if run.get("config", {}).get("model", {}).get("trust_remote_code") and not args.trust_remote_code:
        # the run's own file never turns remote code on; say how to, once
        print(
            "note: the run trained with trust_remote_code; remote code stays off unless you pass "
            "--trust-remote-code",
            file=sys.stderr,
        )

    hub = LUKAEMON_DATASET if protocol == "flowertune" else HUB_DATASET
    questions, source, layout = load_mmlu_with_layout(args.mmlu, args.limit, hub_dataset=hub)
    if adapter is not None:
        default_out = (
            results_path.parent / "eval" if results_path else Path("fedtune-eval") / adapter.resolve().name
        )
    else:
        default_out = Path("fedtune-eval") / "base"
    out = Path(args.out).expanduser() if args.out else default_out
    label = args.label or (f"fedtune ({adapter.resolve().name})" if adapter is not None else BASE_LABEL)
    print(f"MMLU: {len(questions)} questions from {source}; {layout}", file=sys.stderr)
    print(f"protocol: {TITLES[protocol]}", file=sys.stderr)

    started = time.monotonic()
    tokenizer, model = load_model(
        base_model, args.quantization, args.dtype, args.trust_remote_code, args.revision, protocol
    )
    if adapter is not None:
        model = attach_adapter(model, adapter)
    # (table label, artefact slug / run name, with the adapter?)
    plan: list[tuple[str, str, bool]] = []
    if adapter is None:
        plan.append((BASE_LABEL, BASE_LABEL, False))
    else:
        if not args.no_base:
            plan.append((BASE_LABEL, BASE_LABEL, False))
        plan.append((label, args.run_name, True))

    methods: list[tuple[str, dict[str, Any]]] = []
    artefacts: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, slug, with_adapter in plan:
        context = (
            model.disable_adapter() if adapter is not None and not with_adapter else contextlib.nullcontext()
        )
        with context:
            if protocol == "flowertune":
                by_category = _run_flowertune(
                    model, tokenizer, questions, args.batch_size, name, not args.no_progress
                )
                ordered = flowertune.in_evaluator_order(by_category)
                summary = summarize([g.question for g in ordered], flowertune.predictions(ordered))
                artefacts += [str(p) for p in flowertune.write_artefacts(out, slug, by_category)]
            else:
                scored = score_questions(
                    model,
                    tokenizer,
                    questions,
                    batch_size=args.batch_size,
                    max_length=max_length,
                    desc=name,
                    progress=not args.no_progress,
                )
                summary = summarize(questions, [s.prediction for s in scored])
                path = out / f"predictions-{'adapter' if with_adapter else 'base'}.jsonl"
                with open(path, "w", encoding="utf-8") as handle:
                    for q, s in zip(questions, scored, strict=True):
                        record = {
                            "method": name,
                            "subject": q.subject,
                            "prompt": format_prompt(q),
                            "answer": q.answer,
                            "prediction": s.prediction,
                            "logits": list(s.logits),
                        }
                        handle.write(json.dumps(record) + "\n")
                artefacts.append(str(path))
        methods.append((name, summary))

    table = render_table(methods, budget_mb, title=TITLES[protocol])
    payload = {
        "benchmark": "mmlu",
        "protocol": protocol,
        "leaderboard": protocol == "flowertune" and args.quantization == 4,
        "mmlu_source": source,
        "mmlu_layout": layout,
        "num_questions": len(questions),
        "scoring": SCORING[protocol],
        "base_model": base_model,
        "revision": args.revision,
        "trust_remote_code": bool(args.trust_remote_code),
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "quantization": args.quantization,
        "dtype": "float32" if protocol == "flowertune" and args.quantization == 4 else args.dtype,
        "batch_size": args.batch_size,
        "max_length": max_length if protocol == "lm-eval" else None,
        "run_results": str(results_path.resolve()) if results_path else None,
        "budget_mb": budget_mb,
        "seconds": round(time.monotonic() - started, 2),
        "methods": [{"name": name, **summary} for name, summary in methods],
        "artefacts": artefacts,
        "table": table,
    }
    write_json(out / RESULTS_JSON, payload)
    (out / TABLE_MD).write_text(table)
    payload["out"] = str(out)
    return payload


def run(args: argparse.Namespace) -> int:
    """The `fedtune eval` entry point (the console dispatcher calls `run(args)` after `add_arguments`)."""
    payload = evaluate(args)
    print(payload["table"], end="")
    print(f"results: {Path(payload['out']) / RESULTS_JSON}", file=sys.stderr)
    return 0
