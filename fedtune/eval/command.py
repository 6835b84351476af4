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
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.atomic import write_json
from fedtune.errors import FedTuneError

log = logging.getLogger(__name__)

PROTOCOLS = ("flowertune", "lm-eval")
DTYPES = ("auto", "bfloat16", "float16", "float32")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="flowertune",
        help="flowertune: the leaderboard's evaluator, exactly (default); "
        "lm-eval: letter logits with lm-eval's prompt (not leaderboard numbers)",
    )
    parser.add_argument(
        "--adapter",
        help="a PEFT adapter folder (adapter_config.json + weights); without it: the base model only",
    )
    parser.add_argument(
        "--base-model",
        help="base model id or folder (the embedded alias embedded/smollm2-135m-instruct works offline)",
    )
    parser.add_argument(
        "--base-from-adapter",
        action="store_true",
        help="use the adapter_config.json's base_model_name_or_path as the base model (explicit consent: "
        "without it, --base-model is required)",
    )
    parser.add_argument("--revision", help="the base model's hub revision (branch, tag or commit) to load")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the hub (e.g. InternLM3); only this flag enables it",
    )
    parser.add_argument(
        "--mmlu",
        help="local MMLU test data: a folder of lukaemon/mmlu <subject>_test.csv files (headerless "
        "input,A,B,C,D,target: the MMLU tarball's data/test/) or cais/mmlu parquet/JSON(L); "
        "embedded/mmlu-sample: a tiny sample of our own questions (smoke test, not MMLU); "
        "default: the hub (lukaemon/mmlu for flowertune, cais/mmlu for lm-eval)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="flowertune: the evaluator's batch (prompts still run one at a time; the batch's first gold "
        "letter sets max_new_tokens); lm-eval: prompts per forward pass",
    )
    parser.add_argument(
        "--quantization",
        type=int,
        choices=(0, 4, 8),
        default=4,
        help="flowertune: 4 (fp4, float32: the leaderboard's) or 8; "
        "lm-eval: 4 (training's 4-bit settings), 8 or 0 (unquantised)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="lm-eval only: compute dtype (auto: as in training)",
    )
    parser.add_argument(
        "--run-name",
        default="fl",
        help="flowertune: the adapter's run name in acc_mmlu_<category>_<run>.txt (as the evaluator's)",
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
        "--max-length", type=int, default=None, help="lm-eval only: prompt tokens kept (left-truncated; 2048)"
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


def choose_base_model(args: argparse.Namespace, adapter: Path | None) -> str:
    """--base-model, or with --base-from-adapter the adapter's own base; never a silent guess."""
    if args.base_model:
        return str(args.base_model)
    if adapter is None:
        raise FedTuneError("pass --base-model NAME_OR_PATH (and --adapter PATH to score an adapter)")
    if args.base_from_adapter:
        return adapter_base_model(adapter)
    named = ""
    with contextlib.suppress(FedTuneError):
        named = f" (it names {adapter_base_model(adapter)!r})"
    raise FedTuneError(
        "pass --base-model NAME_OR_PATH, or --base-from-adapter to load the base model its "
        f"adapter_config.json names{named}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(
    name: str,
    quantization: int,
    dtype: str,
    trust_remote_code: bool,
    revision: str | None = None,
    protocol: str = "lm-eval",
) -> tuple[Any, Any]:
    """Tokenizer and frozen base model. flowertune: the evaluator's from_pretrained settings; lm-eval:
    training's loader (dtype auto) or the given compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedtune.config import ModelSettings
    from fedtune.embedded import resolve_model
    from fedtune.eval.flowertune import load_settings
    from fedtune.model import load_base_model, load_tokenizer, pick_device

    device = pick_device()
    device_map: Any = {"": 0} if device == "cuda" else "cpu"
    hub = {"trust_remote_code": trust_remote_code, "revision": revision or None}
    model: Any  # transformers' Auto* classes and fedtune.model's loaders type them differently
    tokenizer: Any
    try:
        if protocol == "flowertune":
            settings = load_settings(quantization)
            path = resolve_model(name)
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **settings, **hub)
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)  # as the evaluator: no padding changes
        else:
            model_settings = ModelSettings(
                name=name,
                trust_remote_code=trust_remote_code,
                quantization=quantization,
                revision=revision or "",
            )
            tokenizer = load_tokenizer(model_settings)
            if dtype == "auto":
                model = load_base_model(model_settings, device)  # the training loader, unchanged
            else:
                torch_dtype = getattr(torch, dtype)
                quant = None
                if quantization == 4:
                    quant = BitsAndBytesConfig(
                        load_in_4bit=True,
                        bnb_4bit_quant_type=model_settings.quant_type,
                        bnb_4bit_compute_dtype=torch_dtype,
                    )
                elif quantization == 8:
                    quant = BitsAndBytesConfig(load_in_8bit=True)
                model = AutoModelForCausalLM.from_pretrained(
                    resolve_model(name),
                    quantization_config=quant,
                    dtype=torch_dtype,
                    device_map=device_map,
                    **hub,
                )
            tokenizer.padding_side = "left"
    except OSError as err:
        raise FedTuneError(f"cannot load base model {name!r}: {_first_line(err)}") from None
    model.eval()
    log.info("base model %s (%s protocol): quantization %s, dtype %s", name, protocol, quantization, dtype)
    return tokenizer, model


def saved_adapter_keys(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the adapter's weights file."""
    safetensors = adapter / "adapter_model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as err:  # a truncated or foreign file
            raise FedTuneError(
                f"--adapter {adapter}: unreadable {safetensors.name} ({_first_line(err)})"
            ) from None
    binary = adapter / "adapter_model.bin"
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise FedTuneError(f"--adapter {adapter}: no adapter_model.safetensors (or .bin)")


def attach_adapter(model: Any, adapter: Path) -> Any:
    """The adapter on the base model; every saved tensor must land on a module of the base model with its
    shape, and every LoRA tensor the model then has must come from the file (else: an error, not a score)."""
    from peft import PeftModel, get_peft_model_state_dict

    saved = saved_adapter_keys(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise FedTuneError(
            f"--adapter {adapter}: cannot load it onto the base model ({_first_line(err)})"
        ) from None
    loaded = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(peft_model).items()}
    missing = sorted(set(loaded) - set(saved))
    extra = sorted(set(saved) - set(loaded))
    if missing or extra:
        raise FedTuneError(
            f"--adapter {adapter}: its tensors do not match the base model ({len(extra)} in the file fit no "
            f"module, e.g. {extra[:1]}; {len(missing)} the model expects are missing, e.g. {missing[:1]}): "
            "is it an adapter of this base model?"
        )
    wrong = sorted(key for key in saved if saved[key] != loaded[key])
    if wrong:
        raise FedTuneError(
            f"--adapter {adapter}: {wrong[0]} has shape {saved[wrong[0]]}, the base model's is "
            f"{loaded[wrong[0]]}: is it an adapter of this base model?"
        )
    peft_model.eval()
    return peft_model


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
    if args.batch_size < 1:
        raise FedTuneError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise FedTuneError(f"--limit {args.limit}: must be at least 1")
    if protocol == "flowertune":
        flowertune.load_settings(args.quantization)  # refuses 0 before anything loads
        if args.dtype != "auto" or args.max_length is not None:
            raise FedTuneError(
                "--dtype and --max-length belong to --protocol lm-eval (the evaluator fixes both)"
            )
    if not args.run_name or "/" in args.run_name:
        raise FedTuneError(f"--run-name {args.run_name!r}: a non-empty file-name part")
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
