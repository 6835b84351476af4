"""A message's transfer time over a shaped link, against bytes / bandwidth (issue 12).

The SuperLink and 2 SuperNodes in their own network namespaces (bench/netns.py, the network that
tests/reliability/test_netns.py tests: veth pairs on a bridge, DNS name, TLS), node 1's link shaped both
ways with tc tbf at RATE, node 0's not; a 77 MB adapter (the embedded SmolLM2-135M with LoRA r = 168: the 8B
reference's bytes), 2 rounds. Each download and upload is timed by Flower's own `Receiving` / `Received
successfully` / `Sending` / `Sent successfully` stamps in the SuperNodes' logs. Needs root (ip netns, tc).

    python -m bench.tbf_transfer 50mbit
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import netns
from bench.federation_timeline import supernode_stamps
from bench.supernode_round import REPO
from fedtune import embedded
from fedtune.certs import generate

WORK = Path("/tmp/fedtune-tbf-transfer")


def run_config() -> dict[str, Any]:
    return {
        "num-server-rounds": 2, "strategy.fraction-train": 1.0,
        "model.name": str(embedded.embedded_model_dir()), "model.trust-remote-code": False,
        "model.quantization": 0, "model.lora.r": 168, "model.lora.alpha": 336,
        "train.seq-length": 64, "train.max-steps": 1,
        "static.dataset.name": "embedded/demo-alpaca", "static.num-partitions": 2,
    }


def transfers(log_text: str, run_id: int) -> tuple[list[float], list[float]]:
    """(downloads, uploads) in seconds, from one SuperNode's log."""
    _, events = supernode_stamps(log_text)
    stamps = events.get(run_id, [])

    def times(name: str) -> list[float]:
        return [t for event, t in stamps if event == name]

    down = [b - a for a, b in zip(times("receiving"), times("received"), strict=False)]
    up = [b - a for a, b in zip(times("sending"), times("sent"), strict=False)]
    return down, up


def main(argv: list[str] | None = None) -> None:
    rate = (argv if argv is not None else sys.argv[1:] or ["50mbit"])[0]
    if not rate.endswith("mbit"):
        raise SystemExit(f"RATE must be N mbit (tc's unit), got {rate!r}")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    try:
        netns.setup_network()
        certs = generate(WORK / "certs", [netns.NAME, netns.SUPERLINK_IP, "localhost", "127.0.0.1"])
        fed = netns.NetnsFederation(WORK / "fed", extra_env={"OMP_NUM_THREADS": "1"})
        shutil.copytree(certs.ca_cert.parent, fed.certs_dir, dirs_exist_ok=True)
        shaped = netns.shape(1, rate)
        try:
            fed.start_superlink()
            nodes = {"supernode-0 (not shaped)": fed.node(0, "supernode-0", fed.address),
                     f"supernode-1 ({rate})": fed.node(1, "supernode-1", fed.address)}
            run_id = fed.submit(REPO, overrides=run_config())
            info = fed.wait_for_run(run_id, 1500, poll=5)
            results = json.loads((fed.run_dir(run_id) / "results.json").read_text())
            message = results["rounds"][0]["sent_bytes_down"] / 2
            ideal = message * 8 / (float(rate.removesuffix("mbit")) * 1e6)
            print(f"run {info['status']}; a message {message:,.0f} B ({message / 2**20:.2f} MB); "
                  f"bytes / bandwidth at {rate}: {ideal:.2f} s")
            for name, node in nodes.items():
                down, up = transfers(node.log_text(), run_id)
                print(f"{name}: downloads {', '.join(f'{d:.2f}' for d in down)} s; "
                      f"uploads {', '.join(f'{u:.2f}' for u in up)} s; "
                      f"worst {max(down + up) / ideal:.2f}x bytes / bandwidth")
            print("bytes through tbf:", {f"{ns}/{dev}": netns.qdisc_bytes(ns, dev) for ns, dev in shaped})
        finally:
            fed.stop()
    finally:
        netns.teardown_network()


if __name__ == "__main__":
    main()
