"""`python -m bench.supernode_round sweep`: one process, the model loaded once, each speed variant trained
for the round's steps on the same samples (tokens/s, s/step, peak memory, MFU, loss per step against the
reference, worst-case batch memory under an emulated 24 GB card, an optional torch.profiler table)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.supernode_round import GiB, base_run_config, load_global_arrays, node_config, shape_of

# Speed variants: run-config overrides on top of the reference configuration. All keep 4 samples per
# optimizer step and the same sample order.
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

