"""The flags of `fedtune eval` and what they must be: the parser's options, the checks a run makes before
anything loads, and the choice of base model (never a silent guess: `--base-model`, or the adapter's own base
with `--base-from-adapter`)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from fedtune.errors import FedTuneError

PROTOCOLS = ("flowertune", "lm-eval")
DTYPES = ("auto", "bfloat16", "float16", "float32")


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


def check_arguments(args: argparse.Namespace) -> None:
    """One-line errors for flag values no run can use, before the model or the data load."""
    from fedtune.eval import flowertune

    if args.batch_size < 1:
        raise FedTuneError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise FedTuneError(f"--limit {args.limit}: must be at least 1")
    if args.protocol == "flowertune":
        flowertune.load_settings(args.quantization)  # refuses 0 before anything loads
        if args.dtype != "auto" or args.max_length is not None:
            raise FedTuneError(
                "--dtype and --max-length belong to --protocol lm-eval (the evaluator fixes both)"
            )
    if not args.run_name or "/" in args.run_name:
        raise FedTuneError(f"--run-name {args.run_name!r}: a non-empty file-name part")


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
