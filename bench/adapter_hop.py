"""The warm trainer's adapter hop, in and out of the loaded model: peft's state-dict functions each time
against fedtune.model's key -> parameter map (found once per model), and, with the map, the adapter moved
tensor by tensor (a host copy of each, then encode and pack there) against one buffer cast and laid out on the
device and copied once (`adapter_buffer` / `load_adapter_buffers`, what clientapp/round.py runs). One phase
of a round, timed alone: the whole round, with this phase in it, is bench/federation.py's "trainer has
adapter" and "ClientApp replied" hops.

    python -m bench.adapter_hop --work /tmp/fedtune-bench [--profile reference|fast|PATH.toml] [--reps 5]

The model is the one `bench.supernode_round prepare` built in WORK (the InternLM3-8B shape by default), loaded
as the profile says (4-bit by default). Prints a table and, with --json, the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.federation import machine
from bench.supernode_round import base_run_config, profile_overrides, round_config_for
from fedtune.runtime_env import silence_flwr


def timed(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> list[float]:
    fn()  # warm-up: first-call costs (allocations, the map itself) are not the steady state
    sync()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedtune-bench"))
    parser.add_argument("--profile", default="reference")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    silence_flwr()

    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from clientapp.round import adapter_in, adapter_out
    from fedtune import model as fedtune_model
    from fedtune import packing
    from fedtune.config import FedTuneConfig

    cfg = FedTuneConfig.from_run_config(base_run_config(args.work, profile_overrides(args.profile)))
    device = fedtune_model.pick_device()
    model = fedtune_model.load_trainable_model(cfg.model, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    round_config = round_config_for(cfg, 1)
    record = adapter_out(model, round_config)
    state = fedtune_model.adapter_state(model)

    def peft_read() -> Any:
        live = get_peft_model_state_dict(model)
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in live.items()}

    def out_tensor_by_tensor() -> Any:
        wire = packing.encode(fedtune_model.adapter_state(model), round_config.transport_dtype)
        return packing.to_record(wire, round_config.transport)

    def in_tensor_by_tensor() -> None:
        values = packing.decode(packing.unpack(record).arrays)
        state_in = OrderedDict((k, torch.from_numpy(np.array(v, np.float32))) for k, v in values.items())
        fedtune_model.load_adapter_state(model, state_in)

    def peft_write() -> None:
        set(get_peft_model_state_dict(model))  # the key check the old load_adapter_state made
        set_peft_model_state_dict(model, state)

    phases = {
        "read (peft each call)": peft_read,
        "read (fedtune map)": lambda: fedtune_model.adapter_state(model),
        "write (peft each call)": peft_write,
        "write (fedtune map)": lambda: fedtune_model.load_adapter_state(model, state),
        "adapter_out, tensor by tensor: read + encode + pack": out_tensor_by_tensor,
        "adapter_out, one device buffer (this tree)": lambda: adapter_out(model, round_config),
        "adapter_in, tensor by tensor: unpack + decode + write": in_tensor_by_tensor,
        "adapter_in, buffer by buffer (this tree)": lambda: adapter_in(model, record),
    }
    figures = {name: timed(fn, args.reps, sync) for name, fn in phases.items()}
    payload = {
        "machine": machine(),
        "profile": args.profile,
        "device": device,
        "adapter_tensors": len(state),
        "adapter_mb": sum(t.numel() * 4 for t in state.values()) / 1e6,
        "seconds": figures,
    }
    print(f"machine: {payload['machine']}\nprofile {args.profile}, {device}, {len(state)} adapter tensors "
          f"({payload['adapter_mb']:.1f} MB fp32), median of {args.reps}\n")
    print("| phase | median ms | min ms |\n|---|---|---|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(values) * 1000:.1f} | {min(values) * 1000:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
