"""The node-local warm trainer: a long-lived process next to the SuperNode that keeps the quantised model,
the tokenizer and the tokenised partition resident, and runs each round's training for the ClientApp.

Flower starts a new ClientApp process for every message; importing torch/transformers/bitsandbytes and
loading an 8B model in it costs ~30 s per round. With `fedtune-supernode --warm-trainer` the SuperNode's
launcher starts this service (through supernode/warm_trainer.py, which restarts it if it dies); the ClientApp
(clientapp/warm/client.py) sends it the round over a Unix socket (clientapp/warm/protocol.py) and replies with
what comes back. The service runs the same round code as the in-process ClientApp (clientapp/round.py).

Between rounds, once a round's reply is sent, the service builds the next round's SFTTrainer on the same
settings (clientapp.round.prepare_next_round: ~0.2 s off every later round's critical path; a round whose
settings differ builds its own). FEDTUNE_BUILD_TRAINER_AHEAD=0 switches that off. On a GPU the preload ends
with two one-step warm-up rounds on embedded rows (clientapp.round.warm_up), so round 1 does not compile the
layers or load kernels (FEDTUNE_WARM_UP: 1 always, 0 never).

Hardening (docs/reliability.md): the socket lives in a 0700 directory of the node's user and only peers of
that uid are served (SO_PEERCRED); every connection is handled on its own thread with an I/O timeout, so an
idle or malformed client never blocks or ends the service; a malformed frame gets an error reply. Rounds run
one at a time (a lock); pings answer while a round trains.

    python -m clientapp.warm.service --socket DIR/trainer.sock [--preload RUN_CONFIG.toml]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from clientapp.warm.protocol import (
    IO_TIMEOUT_S,
    PeerGone,
    ProtocolError,
    check_peer,
    check_private_dir,
    recv_frame,
    send_frame,
)
from fedtune.runtime_env import env_tristate

log = logging.getLogger("fedtune.warm.service")

BUILD_AHEAD_ENV = "FEDTUNE_BUILD_TRAINER_AHEAD"  # 0/false: each round builds its trainer itself
WARM_UP_ENV = "FEDTUNE_WARM_UP"  # the preload's warm-up rounds: 1 always, 0 never, unset: on a GPU only

MAX_CONNECTIONS = 16  # concurrent; more are closed at once (one ClientApp per round needs one or two)


class TrainerService:
    def __init__(self, socket_path: str, io_timeout: float = IO_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.io_timeout = io_timeout
        self.cache: Any = None  # clientapp.round.NodeCache, created with the first (heavy) import
        self.rounds = 0
        self.started = time.time()
        self.preload_state = "none"  # none | loading | done | failed: …
        self.warm_up_seconds: float | None = None  # the preload's warm-up rounds, if it ran them
        self.rejected = 0  # connections or frames refused (counted for ping, logged each)
        self._train_lock = threading.Lock()  # one round (or preload) at a time
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    # ---- the model ---------------------------------------------------------------------------------------

    def _node_cache(self) -> Any:
        if self.cache is None:
            from clientapp.round import NodeCache  # torch, transformers, peft: only once the service is up

            self.cache = NodeCache()
        return self.cache

    def preload(self, run_config: dict[str, Any]) -> None:
        """Load this run config's model before the first round asks for it (the SuperNode's start)."""
        with self._train_lock:
            self.preload_state = "loading"
            started = time.perf_counter()
            try:
                from fedtune.config import FedTuneConfig

                cfg = FedTuneConfig.from_run_config(run_config)
                _, _, device = self._node_cache().model_for(cfg)
            except Exception as err:  # the first round loads (and reports) it again
                self.preload_state = f"failed: {type(err).__name__}: {err}"
                log.error("preload failed: %s", traceback.format_exc())
                return
            seconds = time.perf_counter() - started
            log.info("preloaded %s in %.1f s", cfg.model.name, seconds)
            asked = env_tristate(WARM_UP_ENV)
            if asked or (asked is None and device == "cuda"):
                self.warm_up(cfg)
            self.preload_state = "done"

    def warm_up(self, cfg: Any) -> None:
        """Compile and load kernels before round 1 (clientapp.round.warm_up); a failure costs only that."""
        try:
            from clientapp.round import warm_up

            self.warm_up_seconds = warm_up(cfg, self._node_cache())
        except Exception:  # the first round compiles, as without it
            log.error("warm-up failed: %s", traceback.format_exc())
            return
        log.info("warmed up (compiled layers, GPU kernels) in %.1f s", self.warm_up_seconds)

    # ---- requests ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "rounds": self.rounds,
            "model": bool(self.cache is not None and self.cache.model_key is not None),
            "preload": self.preload_state,
            "warm_up_seconds": self.warm_up_seconds,
            "busy": self._train_lock.locked(),
            "trainer_ahead": bool(self.cache is not None and self.cache.next_trainer is not None),
            "rejected": self.rejected,
            "uptime": time.time() - self.started,
        }

    def prepare_next(self, header: dict[str, Any]) -> None:
        """Build the next round's trainer on this round's settings (after its reply is sent)."""
        if env_tristate(BUILD_AHEAD_ENV) is False:
            return
        with self._train_lock:  # the next round's request waits here until it is built
            try:
                from clientapp.round import prepare_next_round
                from fedtune.config import FedTuneConfig
                from fedtune.round_config import RoundConfig

                cfg = FedTuneConfig.from_run_config(header["run_config"])
                seconds = prepare_next_round(
                    cfg, header["node_config"], RoundConfig.from_dict(header["round"]), self._node_cache()
                )
            except Exception:  # the next round builds its own
                log.error("building the next round's trainer failed: %s", traceback.format_exc())
                return
        log.info("next round's trainer built in %.2f s", seconds)

    def train(self, header: dict[str, Any], record: Any) -> tuple[dict[str, Any], Any]:
        for key in ("run_config", "node_config", "round"):
            if not isinstance(header.get(key), dict):
                raise ProtocolError(f"train request lacks the {key!r} object")
        if record is None:
            raise ProtocolError("train request without adapter arrays")
        received = time.time()
        with self._train_lock:  # one round at a time; a request that arrives meanwhile waits here
            from clientapp.round import run_round
            from fedtune.config import FedTuneConfig
            from fedtune.round_config import RoundConfig

            cfg = FedTuneConfig.from_run_config(header["run_config"])
            out, metrics, outcome = run_round(
                cfg, header["node_config"], RoundConfig.from_dict(header["round"]), record, self._node_cache()
            )
            self.rounds += 1
        reply = {
            "ok": True,
            "metrics": metrics,
            "details": {
                "loss_history": list(outcome.loss_history),
                "step_seconds": list(outcome.step_seconds),
            },
            "received_at": received,
            "replied_at": time.time(),
        }
        return reply, out

    def handle(self, conn: socket.socket) -> dict[str, Any] | None:
        """Serve one connection; a trained round's request header comes back, for `prepare_next`."""
        conn.settimeout(self.io_timeout)
        try:
            check_peer(conn)
        except PermissionError as err:
            self.rejected += 1
            log.warning("refused a connection: %s", err)
            return None
        try:
            header, record = recv_frame(conn)
        except ProtocolError as err:
            self.rejected += 1
            log.warning("malformed request: %s", err)
            self._reply(conn, {"ok": False, "error": f"bad request: {err}"})
            return None
        except (PeerGone, OSError) as err:
            log.warning("client went away before its request was complete: %s", err)
            return None
        op = header.get("op")
        if op == "ping":
            self._reply(conn, self.status())
            return None
        if op != "train":
            self.rejected += 1
            self._reply(conn, {"ok": False, "error": f"bad request: unknown op {op!r}"})
            return None
        try:
            reply, out = self.train(header, record)
        except ProtocolError as err:
            self.rejected += 1
            self._reply(conn, {"ok": False, "error": f"bad request: {err}"})
            return None
        except Exception as err:  # report it to the ClientApp, stay up for the next round
            log.error("round failed: %s", traceback.format_exc())
            self._reply(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
            return None
        self._reply(conn, reply, out)
        return header

    @staticmethod
    def _reply(conn: socket.socket, header: dict[str, Any], arrays: Any = None) -> None:
        try:
            send_frame(conn, header, arrays)
        except (OSError, ProtocolError) as err:
            log.warning("could not answer the client: %s", err)

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                trained = self.handle(conn)
            if trained is not None:  # the ClientApp has its reply and the socket is closed
                self.prepare_next(trained)
        except Exception:  # a bug in one connection must not end the service
            log.error("connection handler failed: %s", traceback.format_exc())
        finally:
            self._slots.release()

    # ---- serving -----------------------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        path = Path(self.socket_path)
        check_private_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is never reachable by others, not even for an instant
        try:
            server.bind(str(path))
        finally:
            os.umask(old_umask)
        server.listen(MAX_CONNECTIONS)
        return server

    def serve(self, ready_file: str | None = None, preload: dict[str, Any] | None = None) -> None:
        server = self.bind()
        log.info("warm trainer listening on %s (pid %d)", self.socket_path, os.getpid())
        if preload is not None:  # listen first: the launcher sees the service up while the model loads
            self.preload_state = "loading"
            threading.Thread(target=self.preload, args=(preload,), daemon=True, name="preload").start()
        if ready_file:
            Path(ready_file).write_text(str(os.getpid()))
        try:
            while True:
                conn, _ = server.accept()
                if not self._slots.acquire(blocking=False):
                    self.rejected += 1
                    log.warning("more than %d connections at once: closing one", MAX_CONNECTIONS)
                    conn.close()
                    continue
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)


def main(argv: list[str] | None = None) -> None:
    from fedtune.process import exit_with_parent
    from fedtune.toml_io import read_flat

    parser = argparse.ArgumentParser(prog="fedtune-warm-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path, in a 0700 folder of this user")
    parser.add_argument("--preload", help="run-config TOML whose model to load before the first round")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID")
    parser.add_argument("--ready-file", help="write the pid here once listening (tests, benchmarks)")
    parser.add_argument("--io-timeout", type=float, default=IO_TIMEOUT_S, help="seconds a frame may stall")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.exit_with_parent:
        exit_with_parent(args.exit_with_parent)

    def stop(*_: Any) -> None:  # no slow interpreter/CUDA teardown: remove the socket and go
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    service = TrainerService(args.socket, args.io_timeout)
    try:
        service.serve(args.ready_file, read_flat(args.preload) if args.preload else None)
    except OSError as err:  # not our folder, path too long, a directory in the way: one line, exit 1
        raise SystemExit(f"warm trainer: cannot listen on {args.socket}: {err}") from None


if __name__ == "__main__":
    main()
