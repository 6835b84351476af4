"""Benchmark one SuperNode round of the real ClientApp code path (see bench/README.md).

    python -m bench.supernode_round prepare --out bench/out [--tiny]
    python -m bench.supernode_round sweep  --out bench/out [--variants ref,pf4,...] [--steps 10]
    python -m bench.supernode_round rounds --out bench/out --mode naive|warm [--profiles reference,fast]
        [--rounds N]

`prepare` builds the InternLM3-8B-shaped model with random weights (bf16 safetensors, so every round really
quantises on load), a tokenizer of its vocabulary size, a partition of Alpaca-like rows, and the initial
global adapter as the server would send it.
`sweep` loads the model once and trains the round's steps under each speed variant (same samples, same
effective batch of 4): tokens/s, s/step, peak memory, MFU, and the loss curve of each against the reference.
`rounds` runs whole rounds the way Flower does, each in a fresh ClientApp process: `naive` trains in that
process; `warm` hands the round to the node-local warm trainer. It prints the round's wall-time split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.runtime_env import flwr_env, silence_flwr

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
PARTITION_ROWS = 2600  # alpaca-gpt4's 52,002 rows / 20 partitions
DATA_SEED = 42

# Speed variants: run-config overrides on top of the reference configuration. All keep 4 samples per
# optimizer step and the same sample order.
_PF4 = {
    "train.per-device-train-batch-size": 4,
    "train.gradient-accumulation-steps": 1,
    "train.padding-free": True,
}
_BF16 = {"train.upcast-non-quantized": False}
_COMPILE = {"train.compile-layers": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "ref": {},
    "pad4": {"train.per-device-train-batch-size": 4, "train.gradient-accumulation-steps": 1},
    "pf4": _PF4,
    "pf4-gc2": {**_PF4, "model.gradient-checkpointing-every": 2},
    "pf4-nogc": {**_PF4, "model.gradient-checkpointing": False},
    "pf4-bf16": {**_PF4, **_BF16},
    "pf4-gc2-bf16": {**_PF4, **_BF16, "model.gradient-checkpointing-every": 2},
    "pf4-nogc-bf16": {**_PF4, **_BF16, "model.gradient-checkpointing": False},
    "ref-compile": _COMPILE,
    "pf4-bf16-compile": {**_PF4, **_BF16, **_COMPILE},
    "pf4-gc2-bf16-compile": {**_PF4, **_BF16, **_COMPILE, "model.gradient-checkpointing-every": 2},
    "pf4-nogc-bf16-compile": {**_PF4, **_BF16, **_COMPILE, "model.gradient-checkpointing": False},
    "pf4-nogc-liger": {**_PF4, "model.gradient-checkpointing": False, "train.liger-kernel": True},
    "pf4-gc2-liger": {**_PF4, "model.gradient-checkpointing-every": 2, "train.liger-kernel": True},
}


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
    if name == "reference":
        return {}
    from fedtune.toml_io import read_flat

    return read_flat(REPO / "profiles" / f"{name}.toml")


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
    np.savez(p["adapter"], **{k: v.numpy() for k, v in state.items()})
    numel = sum(v.numel() for v in state.values())
    print(f"adapter: {len(state)} tensors, {numel:,} params = {numel * 4 / 1e6:.2f} MB fp32", flush=True)


def load_global_arrays(out: Path, transport_dtype: str = "float32"):
    """The global adapter as the ClientApp receives it (fp32, or bf16 bit patterns)."""
    import torch

    from fedtune.model import state_to_arrays

    with np.load(paths(out)["adapter"]) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files}
    return state_to_arrays(state, transport_dtype)


# ---- sweep (one process, model loaded once) ------------------------------------------------------------


def mean_context(lengths: list[int]) -> float:
    """Mean causal context length per token of samples of these lengths: Σ s(s+1)/2 / Σ s."""
    return sum(s * (s + 1) / 2 for s in lengths) / max(sum(lengths), 1)


def sweep(
    out: Path,
    variants: list[str],
    steps: int,
    worst: list[str],
    profile_variant: str | None,
    json_path: Path | None,
    card_cap_gib: float = 0.0,
) -> dict[str, Any]:
    import torch

    from bench.synthetic import H100_BF16_DENSE_FLOPS
    from clientapp.trainer import train_one_round
    from fedtune.config import FedTuneConfig
    from fedtune.dataset import load_node_dataset
    from fedtune.model import (
        arrays_to_state,
        load_adapter_state,
        load_tokenizer,
        load_trainable_model,
        pick_device,
    )

    shape = shape_of(out)
    device = pick_device()
    base = FedTuneConfig.from_run_config(base_run_config(out, {"train.max-steps": steps}))
    started = time.perf_counter()
    tokenizer = load_tokenizer(base.model)
    model = load_trainable_model(base.model, device)
    load_seconds = time.perf_counter() - started
    print(
        f"model load + quantisation: {load_seconds:.1f} s; "
        f"{torch.cuda.memory_allocated() / GiB if device == 'cuda' else 0:.2f} GiB on the GPU",
        flush=True,
    )
    trainset, _ = load_node_dataset("unused", node_config(out), 20)
    worstset, _ = load_node_dataset("unused", node_config(out, worst=True), 20)
    initial = arrays_to_state(load_global_arrays(out))
    prepared: dict[str, Any] = {}
    lengths = _sample_lengths(trainset, tokenizer, base.train.seq_length)
    results: dict[str, Any] = {"device": _device_name(), "load_seconds": load_seconds, "variants": {}}

    def run(name: str, dataset, max_steps: int, cache: dict[str, Any] | None) -> dict[str, Any]:
        cfg = FedTuneConfig.from_run_config(
            base_run_config(out, {"train.max-steps": max_steps, **VARIANTS[name]})
        )
        load_adapter_state(model, initial)
        outcome = train_one_round(
            model,
            tokenizer,
            dataset,
            cfg.train,
            cfg.learning_rate(1),
            device,
            cfg.model.gradient_checkpointing,
            cfg.model.gradient_checkpointing_every,
            prepared=cache,
        )
        step = list(outcome.step_seconds)
        n = outcome.steps * cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
        ctx = mean_context(lengths[:n])
        tps = outcome.tokens / outcome.seconds
        steady = step[1:] if len(step) > 1 else step
        return {
            "steps": outcome.steps,
            "tokens": outcome.tokens,
            "train_seconds": outcome.seconds,
            "setup_seconds": outcome.setup_seconds,
            "s_per_step": outcome.seconds / outcome.steps,
            "s_per_step_steady": statistics.mean(steady) if steady else float("nan"),
            "tokens_per_second": tps,
            "peak_gib": outcome.peak_memory_bytes / GiB,
            # what the caching allocator held at most: allocated + fragmentation (a card needs this much)
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if device == "cuda" else 0.0,
            "mfu": tps * shape.train_flops_per_token(ctx) / H100_BF16_DENSE_FLOPS,
            "loss_history": list(outcome.loss_history),
            "step_seconds": step,
        }

    for name in variants:
        if "liger" in name and not _has("liger_kernel"):
            print(f"{name}: skipped (liger-kernel not installed)", flush=True)
            continue
        try:
            compile_seconds = None
            if VARIANTS[name].get("train.compile-layers"):
                # compilation happens once per warm trainer, not per round: warm up, then measure
                started = time.perf_counter()
                run(name, trainset, 2, prepared)
                compile_seconds = time.perf_counter() - started
            result = run(name, trainset, steps, prepared)
            if compile_seconds is not None:
                result["compile_warmup_seconds"] = compile_seconds
        except Exception as err:  # keep sweeping; report the failure
            result = {"error": f"{type(err).__name__}: {err}"}
            torch.cuda.empty_cache() if device == "cuda" else None
        results["variants"][name] = result
        print(_variant_line(name, result), flush=True)
        if json_path:
            json_path.write_text(json.dumps(results, indent=1))
    for name in worst:
        if name not in results["variants"] or "error" in results["variants"][name]:
            continue
        entry = results["variants"][name]
        # A 24 GB card, emulated: the caching allocator may hold at most `card_cap_gib` (the card less the
        # CUDA context and libraries); an out-of-memory error means the variant does not fit such a card.
        capped = device == "cuda" and card_cap_gib > 0
        if capped:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, card_cap_gib * GiB / total))
        try:
            result = run(name, worstset, 2, None)
            entry["worst_case_peak_gib"] = result["peak_gib"]
            entry["worst_case_reserved_gib"] = result["peak_reserved_gib"]
            entry["fits_card_cap"] = True if capped else None
            print(
                f"{name}: worst-case batch (4 × 512 tokens) peak {result['peak_gib']:.2f} GiB allocated, "
                f"{result['peak_reserved_gib']:.2f} GiB reserved"
                + (f"; fits under a {card_cap_gib:.2f} GiB cap" if capped else ""),
                flush=True,
            )
        except Exception as err:
            entry["worst_case_peak_gib"] = f"{type(err).__name__}: {str(err)[:200]}"
            entry["fits_card_cap"] = False if capped and isinstance(err, torch.OutOfMemoryError) else None
            print(f"{name}: worst case failed: {str(err)[:300]}", flush=True)
        finally:
            if capped:
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
    if profile_variant and device == "cuda":
        results["profile"] = _profile(run, profile_variant, trainset, out)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))
    print_sweep(results)
    return results


def _profile(run, name: str, dataset, out: Path) -> dict[str, Any]:
    """Three steps of one variant under torch.profiler: where the time goes (CPU-bound or GPU-bound)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        result = run(name, dataset, 3, None)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cuda_time_total", row_limit=25)
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)
    target = Path(os.environ.get("OUT", out))
    (target / "profile.txt").write_text(table + "\n\n" + table_cpu)
    busy = gpu_us / 1e6 / wall
    print(
        f"profile {name}: 3 steps in {wall:.2f} s, GPU kernels busy {busy:.0%} of the wall time "
        f"(train {result['train_seconds']:.2f} s)",
        flush=True,
    )
    return {"variant": name, "wall": wall, "gpu_kernel_seconds": gpu_us / 1e6, "gpu_busy": busy}


def _sample_lengths(dataset, tokenizer, max_length: int) -> list[int]:
    """Token count of each row in the order the trainer draws them (seeded RandomSampler)."""
    import torch

    from fedtune.config import TrainSettings

    seed = TrainSettings().seed
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    lengths = []
    for i in order[:200]:
        row = dataset[i]
        ids = tokenizer.apply_chat_template(
            row["prompt"] + row["completion"], tokenize=True, return_dict=True
        )
        lengths.append(min(len(ids["input_ids"]), max_length))
    return lengths


def _variant_line(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{name}: FAILED {r['error']}"
    warmup = r.get("compile_warmup_seconds")
    return (
        f"{name}: {r['tokens_per_second']:,.0f} tokens/s, {r['s_per_step']:.3f} s/step "
        f"(steady {r['s_per_step_steady']:.3f}), peak {r['peak_gib']:.2f} GiB, MFU {r['mfu']:.1%}, "
        f"{r['tokens']} tokens in {r['train_seconds']:.2f} s (+{r['setup_seconds']:.2f} s setup)"
        + (f"; compile warm-up (2 steps) {warmup:.1f} s" if warmup is not None else "")
    )


def print_sweep(results: dict[str, Any]) -> None:
    variants = {k: v for k, v in results["variants"].items() if "error" not in v}
    print(f"\n## Sweep on {results['device']} (model load {results['load_seconds']:.1f} s)")
    print(
        "| variant | tokens/s | s/step | steady s/step | peak GiB "
        "| worst-case peak GiB (allocated / reserved) "
        "| MFU | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref = variants.get("ref", {}).get("tokens_per_second")
    for name, r in variants.items():
        worst = r.get("worst_case_peak_gib", "")
        if isinstance(worst, float):
            worst = f"{worst:.2f} / {r.get('worst_case_reserved_gib', float('nan')):.2f}"
        speedup = f"{r['tokens_per_second'] / ref:.2f}×" if ref else ""
        print(
            f"| {name} | {r['tokens_per_second']:,.0f} | {r['s_per_step']:.3f} "
            f"| {r['s_per_step_steady']:.3f} "
            f"| {r['peak_gib']:.2f} | {worst} | {r['mfu']:.1%} | {speedup} |"
        )
    if "ref" in variants:
        print("\nloss per step (same seed, same 4 samples per step):")
        ref_loss = variants["ref"]["loss_history"]
        print("| step | " + " | ".join(variants) + " |")
        print("|---" * (len(variants) + 1) + "|")
        for i in range(len(ref_loss)):
            cells = [
                f"{v['loss_history'][i]:.4f}" if i < len(v["loss_history"]) else "" for v in variants.values()
            ]
            print(f"| {i + 1} | " + " | ".join(cells) + " |")
        for name, v in variants.items():
            n = min(len(ref_loss), len(v["loss_history"]))
            if n and name != "ref":
                diff = max(abs(a - b) for a, b in zip(ref_loss[:n], v["loss_history"][:n], strict=False))
                print(f"max |loss − ref| {name}: {diff:.4f}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---- rounds (fresh ClientApp process per round, as Flower runs it) -------------------------------------


def child(spec_path: Path) -> None:
    """One ClientApp process: imports, receive the message, `train`, build and serialise the reply."""
    t_main = time.time()
    spec = json.loads(spec_path.read_text())
    marks: dict[str, float] = {"spawn": spec["t_spawn"], "python_up": t_main}
    from flwr.app import Array, ArrayRecord
    from flwr.common import serde

    from bench.messages import train_message
    from clientapp import client_app

    marks["imports_flwr"] = time.time()
    if spec["mode"] == "naive":  # what the in-process round will import anyway, timed on its own
        import bitsandbytes  # noqa: F401
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
        import trl  # noqa: F401

        if torch.cuda.is_available():
            torch.cuda.init()
    marks["imports"] = time.time()

    with np.load(spec["adapter"]) as data:  # the message as delivered: arrays in the transport dtype
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(data[k])) for k in data.files})
    msg, context = train_message(
        arrays,
        {
            "server-round": spec["round"],
            "learning-rate": spec["learning_rate"],
            "transport-dtype": spec["transport_dtype"],
        },
        spec["node_config"],
        spec["run_config"],
    )
    marks["message_in"] = time.time()
    reply = client_app.train(msg, context)
    marks["trained"] = time.time()
    payload = serde.recorddict_to_proto(reply.content).SerializeToString()
    marks["reply"] = time.time()
    metrics = dict(reply.content["metrics"])
    result = {
        "marks": marks,
        "metrics": metrics,
        "reply_bytes": len(payload),
        "torch_imported": "torch" in sys.modules,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def _write_spec(
    out: Path, mode: str, run_config: dict[str, Any], rnd: int, transport: str, extra_node: dict[str, Any]
) -> tuple[Path, Path, dict[str, Any]]:
    from fedtune.config import FedTuneConfig

    work = out / "rounds"
    work.mkdir(parents=True, exist_ok=True)
    adapter = work / f"message-{transport}.npz"
    if not adapter.exists():
        record = load_global_arrays(out, transport)
        np.savez(adapter, **{k: a.numpy() for k, a in record.items()})
    cfg = FedTuneConfig.from_run_config(run_config)
    spec_path, result_path = work / f"spec-{mode}-{rnd}.json", work / f"result-{mode}-{rnd}.json"
    spec = {
        "mode": mode,
        "adapter": str(adapter),
        "round": rnd,
        "learning_rate": cfg.learning_rate(rnd),
        "transport_dtype": transport,
        "node_config": {**node_config(out), **extra_node},
        "run_config": run_config,
        "result": str(result_path),
    }
    return spec_path, result_path, spec


def run_child(
    out: Path,
    mode: str,
    run_config: dict[str, Any],
    rnd: int,
    transport: str,
    extra_node: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec_path, result_path, spec = _write_spec(out, mode, run_config, rnd, transport, extra_node or {})
    spec["t_spawn"] = time.time()
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.supernode_round", "child", str(spec_path)], cwd=REPO, env=_child_env()
    )
    t_exit = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"ClientApp process failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    result["marks"]["exit"] = t_exit
    return split(result)


def _child_env() -> dict[str, str]:
    env = flwr_env()  # telemetry and update checks off
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return env


STAGES = (
    "process start + imports",
    "data (partition + tokenise)",
    "model load + quantisation",
    "adapter in",
    "training",
    "adapter out",
    "warm-trainer round trip",
    "reply",
    "other",
)


def split(result: dict[str, Any]) -> dict[str, Any]:
    """The round's wall time (spawn → reply serialised) split into stages."""
    m, x = result["marks"], result["metrics"]
    wall = m["reply"] - m["spawn"]
    service_side = sum(
        x.get(k, 0.0)
        for k in (
            "time-data",
            "time-model-load",
            "time-adapter-in",
            "time-trainer-setup",
            "time-train",
            "time-adapter-out",
        )
    )
    remote = "time-train" in x and not result["torch_imported"]
    stages = {
        "process start + imports": m["imports"] - m["spawn"],
        "data (partition + tokenise)": x.get("time-data", 0.0) + x.get("time-trainer-setup", 0.0),
        "model load + quantisation": x.get("time-model-load", 0.0),
        "adapter in": (m["message_in"] - m["imports"]) + x.get("time-adapter-in", 0.0),
        "training": x.get("time-train", 0.0),
        "adapter out": x.get("time-adapter-out", 0.0),
        "warm-trainer round trip": (m["trained"] - m["message_in"]) - service_side if remote else 0.0,
        "reply": m["reply"] - m["trained"],
    }
    stages["other"] = wall - sum(stages.values())
    return {
        "wall": wall,
        "stages": stages,
        "overhead": 1 - stages["training"] / wall,
        "metrics": x,
        "process_exit": m["exit"] - m["reply"],
        "reply_bytes": result["reply_bytes"],
        "torch_imported_in_clientapp": result["torch_imported"],
    }


def start_service(out: Path, preload: dict[str, Any] | None) -> tuple[subprocess.Popen, str, float]:
    work = out / "rounds"
    work.mkdir(parents=True, exist_ok=True)
    import tempfile

    sock = str(Path(tempfile.mkdtemp(prefix="fedtune-bench-")) / "trainer.sock")  # a private 0700 folder
    ready = work / "service.ready"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "clientapp.warm.service", "--socket", sock, "--ready-file", str(ready)]
    if preload is not None:
        preload_file = work / "preload.toml"
        preload_file.write_text("".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in preload.items()))
        cmd += ["--preload", str(preload_file)]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env())
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"warm trainer exited with {proc.returncode}")
        time.sleep(0.1)
    return proc, sock, time.time() - started


def rounds(
    out: Path,
    mode: str,
    profiles: list[str],
    n: int,
    transport: str,
    json_path: Path | None,
    preload: bool,
    steps: int | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {"mode": mode, "transport": transport, "rounds": []}
    service = None
    extra: dict[str, Any] = {}
    try:
        if mode == "warm":
            first = base_run_config(out, {**profile_overrides(profiles[0]), **_steps(steps)})
            service, sock, startup = start_service(out, first if preload else None)
            results["service_startup_seconds"] = startup
            print(f"warm trainer up in {startup:.1f} s (preload: {preload})", flush=True)
            extra = {"trainer-socket": sock}
        for profile in profiles:
            run_config = base_run_config(out, {**profile_overrides(profile), **_steps(steps)})
            for rnd in range(1, n + 1):
                result = run_child(out, mode, run_config, rnd, transport, extra)
                result.update(profile=profile, round=rnd)
                results["rounds"].append(result)
                print(_round_line(mode, result), flush=True)
                if json_path:
                    json_path.write_text(json.dumps(results, indent=1))
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
    print_rounds(results)
    return results


def _steps(steps: int | None) -> dict[str, Any]:
    return {"train.max-steps": steps} if steps else {}


def _round_line(mode: str, r: dict[str, Any]) -> str:
    x = r["metrics"]
    return (
        f"{mode} {r['profile']} round {r['round']}: wall {r['wall']:.2f} s, "
        f"training {x['time-train']:.2f} s, "
        f"overhead {r['overhead']:.1%}, loss {x['train-loss']:.4f}, {x['tokens-per-second']:,.0f} tokens/s"
    )


def print_rounds(results: dict[str, Any]) -> None:
    rs = results["rounds"]
    if not rs:
        return
    print(f"\n## SuperNode rounds, mode {results['mode']}, transport {results['transport']}")
    print("| stage (s) | " + " | ".join(f"{r['profile']} r{r['round']}" for r in rs) + " |")
    print("|---" * (len(rs) + 1) + "|")
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{r['stages'][stage]:.2f}" for r in rs) + " |")
    print("| **round wall** | " + " | ".join(f"**{r['wall']:.2f}**" for r in rs) + " |")
    print("| overhead (not training) | " + " | ".join(f"{r['overhead']:.1%}" for r in rs) + " |")
    print("| tokens/s | " + " | ".join(f"{r['metrics']['tokens-per-second']:,.0f}" for r in rs) + " |")
    print("| peak GiB | " + " | ".join(f"{r['metrics']['peak-memory-bytes'] / GiB:.2f}" for r in rs) + " |")


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
        child(args.spec)


if __name__ == "__main__":
    silence_flwr()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
