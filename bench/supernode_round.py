"""Benchmark one SuperNode round of the real ClientApp code path (see bench/README.md).

    python -m bench.supernode_round prepare --out bench/out [--tiny]
    python -m bench.supernode_round sweep  --out bench/out [--variants ref,pf4,...] [--steps 10]
    python -m bench.supernode_round rounds --out bench/out --mode naive|warm [--profiles reference,fast]
        [--rounds N]

`prepare` builds the InternLM3-8B-shaped model with random weights (bf16 safetensors, so every round really
quantises on load), a tokenizer of its vocabulary size, a partition of Alpaca-like rows, and the initial
global adapter as the server would send it.
The modes live in their own modules: `bench/sweep.py` and `bench/rounds.py`; this one holds the shared
paths and configs, `prepare`, and the command line.
`sweep` loads the model once and trains the round's steps under each speed variant (same samples, same
effective batch of 4): tokens/s, s/step, peak memory, MFU, and the loss curve of each against the reference.
`rounds` runs whole rounds the way Flower does, each in a fresh ClientApp process: `naive` trains in that
process; `warm` hands the round to the node-local warm trainer. It prints the round's wall-time split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.runtime_env import silence_flwr

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
PARTITION_ROWS = 2600  # alpaca-gpt4's 52,002 rows / 20 partitions
DATA_SEED = 42


def paths(out: Path) -> dict[str, Path]:
    return {
        "model": out / "model",
        "data": out / "data" / "alpaca-like.jsonl",
        "worst": out / "data" / "worst-case.jsonl",
        "adapter": out / "global-adapter.npz",
        "shape": out / "shape.json",
    }


def shape_of(out: Path):
    from bench.synthetic import Shape

    return Shape(**json.loads(paths(out)["shape"].read_text()))


def base_run_config(out: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference configuration (pyproject defaults) pointed at the local model."""
    config: dict[str, Any] = {"model.name": str(paths(out)["model"]), "model.trust-remote-code": False}
    config.update(overrides or {})
    return config


def node_config(out: Path, worst: bool = False) -> dict[str, Any]:
    return {
        "partition-id": 0,
        "num-partitions": 20,
        "data-path": str(paths(out)["worst" if worst else "data"]),
    }


def profile_overrides(name: str) -> dict[str, Any]:
    """The run-config overrides of a profile: "reference" (none), a name under profiles/, or a .toml path."""
    if name == "reference":
        return {}
    from fedtune.toml_io import read_flat

    return read_flat(Path(name) if name.endswith(".toml") else REPO / "profiles" / f"{name}.toml")


# ---- prepare -------------------------------------------------------------------------------------------


def prepare(out: Path, tiny: bool | str, device: str) -> None:
    """`tiny`: False = the InternLM3-8B shape, True or "tiny" = 2 layers, "deep-tiny" = 48 narrow layers."""
    from dataclasses import asdict

    from bench.synthetic import DEEP_TINY, INTERNLM3_8B, TINY, alpaca_like_rows, build_model_dir, write_rows

    shape = {"tiny": TINY, "deep-tiny": DEEP_TINY}.get(str(tiny), TINY) if tiny else INTERNLM3_8B
    p = paths(out)
    out.mkdir(parents=True, exist_ok=True)
    p["shape"].write_text(json.dumps(asdict(shape)))
    started = time.perf_counter()
    write_rows(alpaca_like_rows(PARTITION_ROWS, DATA_SEED, shape.vocab), p["data"])
    worst = alpaca_like_rows(8, DATA_SEED + 1, shape.vocab)
    for row in worst:  # every row longer than the 512-token limit
        row["output"] = " ".join(["w7"] * 600)
    write_rows(worst, p["worst"])
    print(f"data: {PARTITION_ROWS} rows in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    build_model_dir(p["model"], shape, device=device)
    print(
        f"model: {shape.total_params() / 1e9:.2f} B params saved in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    # The server's initial global adapter, as fedtune's ServerApp builds it (meta device, fp32)
    from fedtune.config import FedTuneConfig
    from fedtune.model import initial_adapter_state

    cfg = FedTuneConfig.from_run_config(base_run_config(out))
    state = initial_adapter_state(cfg.model, cfg.train.seed)
    save_npz: Any = np.savez  # numpy's stub types **arrays as its keyword flags
    save_npz(p["adapter"], **{k: v.numpy() for k, v in state.items()})
    numel = sum(v.numel() for v in state.values())
    print(f"adapter: {len(state)} tensors, {numel:,} params = {numel * 4 / 1e6:.2f} MB fp32", flush=True)


def round_config_for(cfg, server_round: int):
    """The round config the ServerApp sends for `server_round` of this run config (no codec), stamped now."""
    from fedtune.round_config import RoundConfig

    return RoundConfig(
        server_round=server_round, learning_rate=cfg.learning_rate(server_round),
        transport_dtype=cfg.model.transport_dtype, transport=cfg.comm.transport, codec={},
        sent_at=time.time(),
    )


def load_global_arrays(out: Path, transport_dtype: str = "float32"):
    """The global adapter as the ClientApp receives it (fp32, or bf16 bit patterns)."""
    from collections import OrderedDict

    import torch

    from fedtune.model import state_to_arrays

    with np.load(paths(out)["adapter"]) as data:
        state = OrderedDict((k, torch.from_numpy(data[k])) for k in data.files)
    return state_to_arrays(state, transport_dtype)




# ---- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.supernode_round", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-256 model of the same family (CPU)")
    p.add_argument(
        "--deep-tiny", dest="tiny", action="store_const", const="deep-tiny",
        help="48 layers of hidden 64: the 8B's 384 adapter tensors at CPU size (transport timing)",
    )
    p.add_argument("--device", default=None)
    s = sub.add_parser("sweep")
    s.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    s.add_argument("--variants", default="ref,pf4,pf4-nogc,pf4-bf16,pf4-gc2-bf16,pf4-nogc-bf16")
    s.add_argument(
        "--worst",
        default="pf4-bf16,pf4-gc2-bf16,pf4-nogc-bf16",
        help="variants whose peak memory is also measured on a 4 × 512-token batch",
    )
    s.add_argument("--steps", type=int, default=10)
    s.add_argument(
        "--card-cap-gib",
        type=float,
        default=24e9 / GiB - 0.75,
        help="worst-case runs: cap the allocator at this many GiB (default: a 24 GB card less ~0.75 GiB of "
        "CUDA context and libraries); 0 = no cap",
    )
    s.add_argument("--profile-variant", default=None)
    s.add_argument("--json", type=Path, default=None)
    r = sub.add_parser("rounds")
    r.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    r.add_argument("--mode", choices=["naive", "warm"], default="naive")
    r.add_argument(
        "--profiles", default="reference", help="comma-separated: reference, fast (profiles/*.toml)"
    )
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--transport", choices=["float32", "bfloat16"], default="float32")
    r.add_argument("--preload", action="store_true", help="warm mode: load the model when the service starts")
    r.add_argument("--steps", type=int, default=None, help="override train.max-steps (CPU smoke runs)")
    r.add_argument("--json", type=Path, default=None)
    c = sub.add_parser("child")
    c.add_argument("spec", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "prepare":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        prepare(args.out, args.tiny, device)
    elif args.cmd == "sweep":
        from bench.sweep import sweep

        sweep(
            args.out,
            [v for v in args.variants.split(",") if v],
            args.steps,
            [v for v in args.worst.split(",") if v],
            args.profile_variant,
            args.json,
            args.card_cap_gib,
        )
    elif args.cmd == "rounds":
        from bench.rounds import rounds

        rounds(
            args.out,
            args.mode,
            args.profiles.split(","),
            args.rounds,
            args.transport,
            args.json,
            args.preload,
            args.steps,
        )
    else:
        from bench.rounds import child

        child(args.spec)


if __name__ == "__main__":
    silence_flwr()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
