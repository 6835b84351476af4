"""Communication vs quality (issue 18): federated runs of the embedded real model under every codec.

    nice python -m bench.communication --seeds 0,1,2 --rounds 3 --steps 4        # CPU, ~1 h on 2 cores
    python -m bench.communication --variants fp32,int8 --seeds 0 --rounds 1 --steps 1   # smoke

THE LEARNING PATH, NOT THE DEPLOYMENT PATH: the rounds run in one process, with no SuperLink, SuperNode or
network. Everything that decides what is learnt is the deployed code itself: the ServerApp's strategy
(`FedTuneAvg.configure_train` → the download codec, `aggregate_train` → validation, decoding and FedAvg in
float32), the ClientApp's `train(msg, context)` (decoding, the trainer's `run_round`, delta + error feedback
in `context.state`, encoding), and the same codec code. What is left out is only how bytes move: Flower's
transport does not change a value. The model stays loaded between rounds (as with a SuperNode's warm
trainer), shared by the simulated nodes, each of which gets the global adapter fresh every round.

Data: the embedded instruction rows (fedtune/embedded.py), the first `--train-rows` split by flwr-datasets
into `--nodes` IID partitions, the last `--holdout` rows held out. `--per-round` nodes are sampled each round
(Flower's sampling, seeded by the seed). Per variant and seed: the held-out loss (mean over completion
tokens, as training counts it) of the global adapter before round 1 and after every round, the leaderboard
bytes of what was actually sent (from results.json, which the strategy writes), the budget of the reference
configuration's shape (InternLM3-8B, 10 rounds × 2 nodes) for that codec, and the FlowerTune-protocol MMLU
sample score (fedtune.eval.flowertune on the embedded MMLU sample) of the final adapter where that module
exists. Output: a Markdown table on stdout and JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from bench.communication_quality import HeldOut, mmlu_sample
from fedtune.runtime_env import silence_flwr

silence_flwr()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> run-config overrides (comm.*); budget names in fedtune.codecs.budget.TABLE_SPECS
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"comm.codec": "bf16"},
    "int8": {"comm.codec": "int8"},
    "int8-nf4": {"comm.codec": "nf4", "comm.download-codec": "int8"},
    "nf4": {"comm.codec": "nf4"},
    "int4": {"comm.codec": "int4"},
    "ffa": {"comm.ffa-lora": True},
    "ffa-bf16": {"comm.codec": "bf16", "comm.ffa-lora": True},
    "ffa-int8": {"comm.codec": "int8", "comm.ffa-lora": True},
    "ffa-nf4": {"comm.codec": "nf4", "comm.ffa-lora": True},
}
DEFAULT_VARIANTS = "fp32,int8,int8-nf4,nf4,ffa-int8"


class BenchGrid:
    """What Flower's FedAvg asks of a Grid when it samples: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def prepare_data(args: argparse.Namespace, folder: Path) -> tuple[Path, list[dict[str, str]]]:
    from fedtune.embedded import demo_rows

    rows = demo_rows(args.train_rows + args.holdout, seed=args.data_seed)
    train, held_out = rows[: args.train_rows], rows[args.train_rows :]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return path, held_out


def run_config(args: argparse.Namespace, data: Path, seed: int, variant: dict[str, Any]) -> dict[str, Any]:
    from fedtune.config import KEYS

    # where this checkout knows them: the chat prompt format (what HeldOut scores) and nf4 computing in
    # bf16 (the faster 4-bit path on a CPU); both are about training, not about what the codecs send
    optional = {"train.prompt-format": "chat", "model.quant-type": "nf4", "model.compute-dtype": "bfloat16"}
    return {
        **{k: v for k, v in optional.items() if k in KEYS},
        "model.gradient-checkpointing": False,
        **({"train.optim": args.optim} if args.optim else {}),
        "num-server-rounds": args.rounds,
        "strategy.fraction-train": args.per_round / args.nodes,
        "strategy.min-train-nodes": args.per_round,
        "strategy.min-available-nodes": args.per_round,
        "model.name": args.model,
        "model.trust-remote-code": False,
        "model.quantization": args.quantization,
        "train.seq-length": args.seq_length,
        "train.max-steps": args.steps,
        "train.learning-rate-max": args.lr_max,
        "train.learning-rate-min": args.lr_min,
        "train.seed": seed,
        "train.save-every-round": 0,
        "static.dataset.name": str(data),
        "static.num-partitions": args.nodes,
        **variant,
    }


def build_random_model(size: str, tokenizer_dir: str | None, target: Path) -> Path:
    """A randomly initialised Llama ("HIDDEN,LAYERS") with SmolLM2's tokenizer and chat template, saved to
    `target`: NOT real weights. The tests' recipe (a large init, so that LoRA visibly learns in a few steps),
    for a machine that cannot hold the embedded model (the GPU machine's transfer limit is 64 MiB)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, set_seed

    from fedtune.embedded import embedded_model_dir

    hidden, layers = (int(n) for n in size.split(","))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 16),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def load_shared_model(cfg: Any) -> tuple[Any, Any, str]:
    from clientapp.round import model_key
    from fedtune.model import load_tokenizer, load_trainable_model, pick_device

    tokenizer = load_tokenizer(cfg.model)
    return load_trainable_model(cfg.model, pick_device()), tokenizer, model_key(cfg)


def run_one(
    name: str, seed: int, args: argparse.Namespace, data: Path, held_out: HeldOut, shared: tuple, work: Path
) -> dict[str, Any]:
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from transformers import set_seed

    import clientapp.client_app as client_app
    from clientapp.round import NodeCache, run_round
    from fedtune.codecs.budget import internlm3_8b_lora_shapes, run_budget
    from fedtune.config import FedTuneConfig
    from fedtune.model import arrays_to_state, initial_adapter_state, load_adapter_state, state_to_arrays
    from fedtune.results import ResultsFile, RunResults
    from serverapp.strategy import FedTuneAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = seed + 1, 1, 1
    config = run_config(args, data, seed, VARIANTS[name])
    cfg = FedTuneConfig.from_run_config(config)
    model, tokenizer, key = shared
    node_ids = list(range(1, args.nodes + 1))
    device = next(model.parameters()).device.type
    caches = {i: NodeCache(model_key=key, model=model, tokenizer=tokenizer, device=device) for i in node_ids}

    def cached_round(cfg, node_config, round_config, global_arrays, _fresh_cache):
        # the warm trainer's reuse: the model stays loaded; each node keeps its own data
        cache = caches[int(node_config["partition-id"]) + 1]
        return run_round(cfg, node_config, round_config, global_arrays, cache)

    client_app.run_round = cached_round
    contexts = {
        i: Context(
            run_id=seed + 1, node_id=i, node_config={"partition-id": i - 1, "num-partitions": args.nodes},
            state=RecordDict(), run_config=config,
        )
        for i in node_ids
    }
    run_dir = work / f"{name}-seed{seed}"
    results = ResultsFile(run_dir, RunResults(run_id=seed + 1, config=cfg.to_dict()))
    strategy = FedTuneAvg(cfg, results)
    grid = BenchGrid(node_ids)
    random.seed(seed)  # Flower samples nodes with `random`
    set_seed(seed)
    global_arrays = state_to_arrays(initial_adapter_state(cfg.model, seed), "float32")

    def evaluate(arrays: Any) -> float:
        load_adapter_state(model, arrays_to_state(arrays))
        return held_out.loss(model)

    losses = [evaluate(global_arrays)]
    started = time.monotonic()
    for server_round in range(1, args.rounds + 1):
        bench_grid = cast(Any, grid)  # a stand-in with the two methods FedAvg calls
        messages = list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), bench_grid))
        replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        record = results.results.rounds[-1]
        if record.rejected or record.failed or not record.aggregated:
            raise RuntimeError(f"{name} seed {seed} round {server_round}: {record.rejected or record.failed}")
        assert arrays is not None  # aggregated, checked just above
        global_arrays = arrays
        losses.append(evaluate(global_arrays))
        print(f"  {name} seed {seed} round {server_round}: held-out loss {losses[-1]:.4f} "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    strategy.finish()  # the last `latest/` checkpoint
    mmlu = None if args.no_mmlu else mmlu_sample(model, tokenizer)  # the final global is loaded
    spec = cfg.comm.spec()
    reference = run_budget(internlm3_8b_lora_shapes(), spec)
    return {
        "variant": name, "seed": seed, "codec": spec.label(), "held_out_loss": losses,
        "budget_bytes": results.results.budget_bytes, "budget_mb": results.results.budget_mb,
        "rounds": [
            {"round": r.round, "bytes_down": r.bytes_down, "bytes_up": r.bytes_up, "train_loss": r.train_loss}
            for r in results.results.rounds
        ],
        "reference_budget_mb": reference.total_mb, "mmlu_sample": mmlu,
        "seconds": time.monotonic() - started,
    }


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def table(runs: list[dict[str, Any]], variants: list[str]) -> str:
    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    if not runs:
        return "no run finished"
    base = [r["held_out_loss"][-1] for r in runs if r["variant"] == "fp32"]
    base_by_seed = {r["seed"]: r["held_out_loss"][-1] for r in runs if r["variant"] == "fp32"}
    rounds = len(runs[0]["held_out_loss"]) - 1
    head = ["codec", "reference run MB (InternLM3-8B, 10 rounds)", "this run MB"]
    head += [f"held-out loss after round {i}" for i in range(rounds + 1)]
    head += ["final − fp32, paired by seed", "MMLU sample (flowertune protocol)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        cells = [mine[0]["codec"], f"{mine[0]['reference_budget_mb']:.2f}", f"{mine[0]['budget_mb']:.2f}"]
        cells += [spread([r["held_out_loss"][i] for r in mine]) for i in range(rounds + 1)]
        paired = [r["held_out_loss"][-1] - base_by_seed[r["seed"]] for r in mine if r["seed"] in base_by_seed]
        cells.append(spread(paired) if paired and base else "n/a")
        scores = [r["mmlu_sample"]["all"] for r in mine if r.get("mmlu_sample")]
        cells.append(spread(scores) if scores else "not measured")
        lines.append("| " + " | ".join(cells) + " |")
    for r in failed:
        lines.append(f"\n{r['variant']} seed {r['seed']} failed: {r['error']}")
    if base:
        lines.append("")
        lines.append(f"fp32 seed-to-seed spread of the final held-out loss: {spread(base)} "
                     f"(min {min(base):.4f}, max {max(base):.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.communication", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per node per round")
    parser.add_argument("--nodes", type=int, default=4, help="partitions (simulated SuperNodes)")
    parser.add_argument("--per-round", type=int, default=2, help="nodes sampled per round")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr-max", type=float, default=3e-4)
    parser.add_argument("--lr-min", type=float, default=1e-4)
    parser.add_argument("--quantization", type=int, default=4, choices=(0, 4, 8))
    parser.add_argument("--model", default="embedded/smollm2-135m-instruct")
    parser.add_argument("--no-mmlu", action="store_true")
    parser.add_argument(
        "--random-model", metavar="HIDDEN,LAYERS",
        help="instead of --model: a randomly initialised Llama of this size (not real weights)",
    )
    parser.add_argument("--tokenizer", help="its tokenizer folder (default: the embedded model's)")
    parser.add_argument("--optim", help="train.optim (default: the run config's, paged_adamw_8bit)")
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON",
        help="print one table from earlier --out files (e.g. one process per seed) and write it to --out",
    )
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        runs: list[dict[str, Any]] = [run for payload in loaded for run in payload["runs"]]
        variants = list(dict.fromkeys(run["variant"] for run in runs))
        print(table(runs, variants))
        if args.out:
            settings = [payload["settings"] for payload in loaded]
            merged = {"settings": settings, "runs": runs, "table": table(runs, variants)}
            args.out.write_text(json.dumps(merged, indent=1))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from fedtune.config import FedTuneConfig

    runs = []
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-comm-") as tmp:
        work = Path(tmp)
        data, rows = prepare_data(args, work)
        if args.random_model:
            args.model = str(build_random_model(args.random_model, args.tokenizer, work / "model"))
        cfg = FedTuneConfig.from_run_config(run_config(args, data, 0, {}))
        shared = load_shared_model(cfg)
        held_out = HeldOut(shared[1], rows, args.seq_length)
        for seed in seeds:  # seed-major: a partial run still has every variant of the first seeds
            for name in variants:
                try:
                    runs.append(run_one(name, seed, args, data, held_out, shared, work))
                except Exception as err:  # one broken variant must not lose the others' figures
                    error = f"{type(err).__name__}: {err}"
                    print(f"  {name} seed {seed} FAILED: {error}", file=sys.stderr, flush=True)
                    runs.append({"variant": name, "seed": seed, "error": error})
                if args.out:
                    write(args, runs, variants)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    machine = f"{platform.node()} ({os.cpu_count()} CPUs{gpu}, torch {torch.__version__})"
    print(f"\n{table(runs, variants)}\n\nmachine: {machine}; seeds {seeds}; command: "
          f"python -m bench.communication {' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.out:
        write(args, runs, variants)
    return 0


def write(args: argparse.Namespace, runs: list[dict[str, Any]], variants: list[str]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"settings": settings, "runs": runs, "table": table(runs, variants)}
    args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    sys.exit(main())
