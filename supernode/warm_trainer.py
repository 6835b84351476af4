"""Start and keep alive the node-local warm trainer (clientapp/warm/service.py) for `fedtune-supernode`.

The launcher exec()s into flower-supernode, so it cannot watch the service itself: it starts a small
supervisor process (this module's `main`) that runs the service, restarts it if it dies (backing off while it
keeps dying), and ends it when the SuperNode is gone. The launcher waits until the service answers a ping over
its socket and fails the SuperNode's start with one line if it never does.

Where things live:
- the socket: `<private dir>/trainer.sock`, the directory 0700 and owned by the node's user — by default a
  fresh `mkdtemp` folder (`$XDG_RUNTIME_DIR` when set), never a predictable path in a shared /tmp;
- torch.compile's caches (Inductor's FX-graph and AOT-autograd caches, Triton kernels): a persistent
  node-local folder (`--compile-cache`, default `~/.cache/fedtune/torch-compile`), so a restarted trainer
  reuses the compiled layers instead of paying the compilation again in its first round.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clientapp.warm.protocol import SOCKET_NAME, check_private_dir, ping
from fedtune.errors import FedTuneError

log = logging.getLogger("fedtune.warm.supervisor")

READY_TIMEOUT_ENV = "FEDTUNE_WARM_TRAINER_READY_TIMEOUT"
DEFAULT_READY_TIMEOUT_S = 120.0
COMPILE_CACHE_ENV = "FEDTUNE_COMPILE_CACHE_DIR"
RESTART_BACKOFF_S = (1.0, 30.0)  # first wait, longest wait between restarts of a service that keeps dying
STABLE_AFTER_S = 60.0  # a service that ran this long before dying is restarted at once


MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, NUL included


def private_socket(requested: str | None, clientapp_port: int) -> str:
    """The trainer's socket path, in a 0700 folder of this user (created here when it does not exist)."""
    if requested:
        length = len(os.fsencode(Path(requested).expanduser().resolve()))
        if length > MAX_SOCKET_PATH:
            raise FedTuneError(
                f"--trainer-socket {requested}: {length} bytes, a Unix socket path may have {MAX_SOCKET_PATH}"
            )
        folder = Path(requested).expanduser().resolve().parent
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True)
        try:
            check_private_dir(folder)
        except PermissionError as err:
            raise FedTuneError(f"--trainer-socket {requested}: {err}") from None
        return str(folder / Path(requested).name)
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not Path(base).is_dir():
        base = None
    made = tempfile.mkdtemp(prefix=f"fedtune-warm-{clientapp_port}-", dir=base)  # 0700, unpredictable name
    return str(Path(made) / SOCKET_NAME)


def compile_cache_dir(requested: str | None) -> str | None:
    """A persistent folder for torch.compile's on-disk caches, or None (then torch's default in /tmp)."""
    default = Path.home() / ".cache" / "fedtune" / "torch-compile"
    raw = requested or os.environ.get(COMPILE_CACHE_ENV) or str(default)
    folder = Path(raw).expanduser()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:  # a read-only home (hardened containers): compile as before, just not cached
        log.warning("compile cache %s not writable (%s): using torch's default", folder, err)
        return None
    return str(folder)


def service_env(cache_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if cache_dir:
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)  # FX graph + AOT autograd caches live here
        env.setdefault("TRITON_CACHE_DIR", str(Path(cache_dir) / "triton"))
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return env


def service_command(socket_path: str, preload: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "clientapp.warm.service", "--socket", socket_path]
    return cmd + (["--preload", preload] if preload else [])


def spawn(
    socket_path: str,
    preload: str | None = None,
    compile_cache: str | None = None,
    log_file: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start the supervisor (and through it the service); it ends when this process (or what it exec()s
    into) ends."""
    cmd = [
        sys.executable, "-m", "supernode.warm_trainer",
        "--socket", socket_path, "--exit-with-parent", str(os.getpid()),
    ]
    if preload:
        cmd += ["--preload", preload]
    if compile_cache:
        cmd += ["--compile-cache", compile_cache]
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)


def wait_ready(
    socket_path: str, supervisor: subprocess.Popen[bytes], timeout: float | None = None
) -> dict[str, Any]:
    """Block until the service answers a ping; stop the supervisor and fail in one line if it never does."""
    if timeout is None:
        raw = os.environ.get(READY_TIMEOUT_ENV, "")
        timeout = float(raw) if raw else DEFAULT_READY_TIMEOUT_S
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ping(socket_path, timeout=2.0)
        if status is not None:
            return status
        if supervisor.poll() is not None:
            raise FedTuneError(f"warm trainer failed to start (exit {supervisor.returncode}); see its log")
        time.sleep(0.2)
    stop(supervisor)
    raise FedTuneError(
        f"warm trainer not ready after {timeout:.0f} s at {socket_path} ({READY_TIMEOUT_ENV} to wait longer)"
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def end_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps it (our child)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # already reaped
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# ---- the supervisor process -------------------------------------------------------------------------------


def supervise(
    socket_path: str, preload: str | None, cache_dir: str | None, parent: int | None = None
) -> None:
    """Run the service; start it again whenever it dies, until we are told to stop or `parent` is gone."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None
    backoff = RESTART_BACKOFF_S[0] / 2

    def shutdown(*_: Any) -> None:
        # May run as a signal handler while the main thread blocks in child.wait() (which holds Popen's
        # lock): end the child with plain os calls, never through Popen.
        nonlocal stopping
        stopping = True
        if child is not None:
            end_process(child.pid)
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        folder = Path(socket_path).parent
        if folder.name.startswith("fedtune-warm-"):  # the mkdtemp folder private_socket made
            with contextlib.suppress(OSError):
                folder.rmdir()
        os._exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    from fedtune.process import exit_with_parent

    if parent is not None:
        exit_with_parent(parent, on_gone=shutdown)
    env = service_env(cache_dir)
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(service_command(socket_path, preload), env=env)
        code = child.wait()
        if stopping:
            break
        ran = time.monotonic() - started
        backoff = RESTART_BACKOFF_S[0] if ran > STABLE_AFTER_S else min(backoff * 2, RESTART_BACKOFF_S[1])
        log.warning("warm trainer exited with %s after %.0f s: restarting in %.0f s", code, ran, backoff)
        time.sleep(backoff)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedtune-warm-supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload")
    parser.add_argument("--compile-cache")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    supervise(args.socket, args.preload, args.compile_cache, args.exit_with_parent)


if __name__ == "__main__":
    main()
