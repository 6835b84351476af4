"""The node-local warm trainer: a process next to the SuperNode that keeps the quantised model resident.

Flower starts a new ClientApp process for every message; loading torch/transformers/bitsandbytes and an 8B
model in it costs ~30 s per round. `fedtune-supernode --warm-trainer` starts this service first; the
ClientApp (clientapp/warm_client.py) sends it the global adapter and the round config over a Unix socket and
replies with the update. The service runs the same round code as the in-process ClientApp
(clientapp/round.py), loading the model on the first request (or at start with --preload) and again only
when a run asks for a different model. One round at a time; requests queue on the socket.

    python -m supernode.trainer_service --socket /tmp/fedtune-trainer.sock [--preload RUN_CONFIG.toml]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune.trainer_service")


def default_socket_path(clientapp_port: int) -> str:
    """One service per SuperNode: keyed by the SuperNode's (host-unique) ClientApp port."""
    return str(Path(tempfile.gettempdir()) / f"fedtune-trainer-{clientapp_port}.sock")


def load_run_config_file(path: str) -> dict[str, Any]:
    """A flat run-config TOML (as given to `flwr run --run-config`)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    with open(path, "rb") as handle:
        data = tomllib.load(handle)

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", data)
    return flat


class TrainerService:
    def __init__(self, socket_path: str) -> None:
        from clientapp.round import NodeCache

        self.socket_path = socket_path
        self.cache = NodeCache()
        self.rounds = 0
        self.started = time.time()

    def preload(self, run_config: dict[str, Any]) -> None:
        from clientapp.round import model_key
        from fedtune.config import FedTuneConfig
        from fedtune.model import load_tokenizer, load_trainable_model, pick_device

        cfg = FedTuneConfig.from_run_config(run_config)
        started = time.perf_counter()
        device = pick_device()
        self.cache.tokenizer = load_tokenizer(cfg.model)
        self.cache.model = load_trainable_model(cfg.model, device)
        self.cache.device, self.cache.model_key = device, model_key(cfg)
        log.info("preloaded %s in %.1f s", cfg.model.name, time.perf_counter() - started)

    def handle(self, conn: socket.socket) -> None:
        from clientapp.warm_client import recv_frame, send_frame

        header, record = recv_frame(conn)
        op = header.get("op")
        if op == "ping":
            send_frame(
                conn,
                {
                    "ok": True,
                    "rounds": self.rounds,
                    "model": self.cache.model_key is not None,
                    "pid": os.getpid(),
                    "uptime": time.time() - self.started,
                },
            )
            return
        if op != "train":
            send_frame(conn, {"ok": False, "error": f"unknown op {op!r}"})
            return
        try:
            from clientapp.round import run_round
            from fedtune.config import FedTuneConfig

            cfg = FedTuneConfig.from_run_config(header["run_config"])
            rnd = header["round"]
            if record is None:
                raise ValueError("train request without adapter arrays")
            out, metrics, outcome = run_round(
                cfg,
                header["node_config"],
                int(rnd["server-round"]),
                float(rnd["learning-rate"]),
                str(rnd["transport-dtype"]),
                record,
                cache=self.cache,
            )
            self.rounds += 1
            details = {"loss_history": list(outcome.loss_history), "step_seconds": list(outcome.step_seconds)}
        except Exception as err:  # report it to the ClientApp, stay up for the next round
            log.error("round failed: %s", traceback.format_exc())
            send_frame(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
            return
        send_frame(conn, {"ok": True, "metrics": metrics, "details": details}, out)

    def serve(self, ready_file: str | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)  # the SuperNode's user only
        server.listen(8)
        log.info("warm trainer listening on %s (pid %d)", self.socket_path, os.getpid())
        if ready_file:
            Path(ready_file).write_text(str(os.getpid()))
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    try:
                        self.handle(conn)
                    except (ConnectionError, OSError) as err:
                        log.warning("client went away: %s", err)
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def _exit_with_parent(parent: int) -> None:
    """Stop when the SuperNode that started us is gone (we were reparented)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                log.info("parent %d gone: stopping", parent)
                os._exit(0)
            time.sleep(2.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def spawn(socket_path: str, preload: str | None = None, log_file: str | None = None) -> subprocess.Popen:
    """Start the service as a child that ends with its parent (the launcher, then flower-supernode)."""
    cmd = [
        sys.executable,
        "-m",
        "supernode.trainer_service",
        "--socket",
        socket_path,
        "--exit-with-parent",
        str(os.getpid()),
    ]
    if preload:
        cmd += ["--preload", preload]
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedtune-trainer-service", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--preload", help="run-config TOML whose model to load before the first round")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID")
    parser.add_argument("--ready-file", help="write the pid here once listening (tests, benchmarks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.exit_with_parent:
        _exit_with_parent(args.exit_with_parent)
    def stop(*_: Any) -> None:  # no slow interpreter/CUDA teardown: remove the socket and go
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    service = TrainerService(args.socket)
    if args.preload:
        service.preload(load_run_config_file(args.preload))
    service.serve(args.ready_file)


if __name__ == "__main__":
    main()
