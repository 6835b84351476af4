"""`python -m bench.supernode_round rounds`: whole SuperNode rounds of the real ClientApp code, each in a
fresh process as Flower runs it (`naive`: training in that process; `warm`: handed to the node-local warm
trainer), with the round's wall time split into stages. No SuperLink and no transport: bench/federation.py
times those."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.supernode_round import (
    REPO,
    GiB,
    base_run_config,
    load_global_arrays,
    node_config,
    profile_overrides,
)
from fedtune.runtime_env import flwr_env

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
            shutil.rmtree(Path(sock).parent, ignore_errors=True)  # start_service's private folder
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


