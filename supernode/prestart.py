"""The SuperNode's SuperExec with each ClientApp process started before its message (clientapp_worker).

Flower 1.42's SuperExec asks its executor to start a fresh `flwr-clientapp` for every task. This executor
keeps one worker waiting — Python started, Flower imported — and hands it the next ClientApp task's token,
then starts the next worker at once, so it is ready however soon the next message comes (waiting for the
task's process to end first left the next round cold whenever its message came while that process was
still exiting). Its imports (1-3 s of one core) overlap the round's training: nothing on a GPU host; on a
2-core CPU host a little of the training's CPU. Everything else is
Flower's: the SuperExec's poll loop, `run_clientapp`, the Runtime API. A task the worker cannot take (other
task types, other TLS settings, hidden output, a worker that died) is started cold, as Flower does.

`python -m supernode.prestart ARGS` is `flower-superexec ARGS` with this executor for the local (subprocess)
executor type; `supernode.flower_entry` starts it in place of `flower-superexec`."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger("fedtune.prestart")

WORKER_MODULE = "supernode.clientapp_worker"
CLIENTAPP_TASK = "flwr-clientapp"  # flwr.supercore.constant.TaskType.CLIENT_APP
# A worker that dies this soon after its start is broken (e.g. an import fails): stop prestarting after
# MAX_QUICK_DEATHS of those in a row and start every task cold, so a broken install cannot spin.
QUICK_DEATH_S = 10.0
MAX_QUICK_DEATHS = 3


@dataclass(frozen=True)
class WorkerSettings:
    """What a prestarted worker was started with; a task with other settings is started cold."""

    runtime_api_address: str
    insecure: bool
    root_certificates_path: str | None
    runtime_dependency_install: bool
    parent_pid: int

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", WORKER_MODULE, "--runtime-api-address", self.runtime_api_address,
               "--parent-pid", str(self.parent_pid)]
        if self.insecure:
            cmd.append("--insecure")
        elif self.root_certificates_path is not None:
            cmd += ["--root-certificates", self.root_certificates_path]
        if self.runtime_dependency_install:
            cmd.append("--allow-runtime-dependency-installation")
        return cmd

    def matches(self, spec: Any) -> bool:
        return (
            str(spec.task_type) == CLIENTAPP_TASK
            and not spec.suppress_output
            and spec.runtime_api_address == self.runtime_api_address
            and spec.insecure == self.insecure
            and spec.root_certificates_path == self.root_certificates_path
            and spec.runtime_dependency_install == self.runtime_dependency_install
        )


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    started: float

    @property
    def stdin(self) -> IO[bytes]:
        assert self.process.stdin is not None
        return self.process.stdin


class PrestartedClientAppExecutor:
    """Flower's executor protocol (flwr.supercore.superexec.executor.types.Executor), one worker ahead."""

    def __init__(self, settings: WorkerSettings, cold: Any) -> None:
        self.settings = settings
        self.cold = cold  # Flower's SubprocessExecutor: every task this one does not take
        self.idle: Worker | None = None
        self.busy: list[subprocess.Popen[bytes]] = []
        self.quick_deaths = 0
        self.handed_over = 0
        self._start_idle()

    # -- the protocol -------------------------------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set[Any], **tls: Any) -> tuple[set[Any], set[str]]:
        result: tuple[set[Any], set[str]] = self.cold.get_eligible_capacity(supported_task_types, **tls)
        return result

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self.cold.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor import LaunchResult

        worker = self._take_idle() if self.settings.matches(spec) else None
        if worker is None:
            return self.cold.launch(spec)
        try:
            worker.stdin.write(spec.token.encode() + b"\n")
            worker.stdin.close()
        except OSError:  # it died between the check and the write: this task goes cold
            self._reap(worker.process)
            return self.cold.launch(spec)
        self.busy.append(worker.process)
        self.handed_over += 1
        self._start_idle()
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Called by the SuperExec's loop before every task poll."""
        self.busy = [p for p in self.busy if p.poll() is None]
        if self.idle is not None and self.idle.process.poll() is not None:
            worker, self.idle = self.idle, None
            self._note_death(worker)
        self._start_idle()

    def close(self) -> None:
        if self.idle is not None:
            worker, self.idle = self.idle, None
            with contextlib.suppress(OSError):
                worker.stdin.close()  # an idle worker exits on EOF
            self._reap(worker.process)
        self.cold.close()

    # -- workers ------------------------------------------------------------------------------------------
    def _start_idle(self) -> None:
        if self.idle is not None or self.quick_deaths >= MAX_QUICK_DEATHS:
            return
        process = subprocess.Popen(self.settings.command(), stdin=subprocess.PIPE)
        self.idle = Worker(process, time.monotonic())

    def _take_idle(self) -> Worker | None:
        worker, self.idle = self.idle, None
        if worker is not None and worker.process.poll() is not None:
            self._note_death(worker)
            return None
        return worker

    def _note_death(self, worker: Worker) -> None:
        quick = time.monotonic() - worker.started < QUICK_DEATH_S
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        log.warning("prestarted ClientApp worker exited (code %s) before its task", worker.process.returncode)
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.warning("ClientApp workers keep dying at start: every task now starts a cold flwr-clientapp")

    @staticmethod
    def _reap(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    """`flower-superexec` (Flower's CLI and loop) with the prestarting executor for local tasks."""
    import importlib

    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec.executor import SubprocessExecutor

    # the modules, not the functions of the same names their packages export
    cli: Any = importlib.import_module("flwr.supercore.cli.flower_superexec")
    loop: Any = importlib.import_module("flwr.supercore.superexec.run_superexec")
    flower_get_executor, flower_run = loop.get_executor, loop.run_superexec

    def run(**kwargs: Any) -> None:
        def get_executor(executor_type: Any, *args: Any, **options: Any) -> Any:
            if executor_type != ExecutorType.SUBPROCESS:
                return flower_get_executor(executor_type, *args, **options)
            settings = WorkerSettings(
                runtime_api_address=kwargs["runtime_api_address"],
                insecure=kwargs["insecure"],
                root_certificates_path=kwargs.get("root_certificates_path"),
                runtime_dependency_install=kwargs.get("runtime_dependency_install", False),
                parent_pid=os.getpid(),
            )
            return PrestartedClientAppExecutor(settings, SubprocessExecutor())

        loop.get_executor = get_executor
        flower_run(**kwargs)

    cli.run_superexec = run
    from fedtune.logs import run_with_logging

    run_with_logging(cli.flower_superexec, ["flower-superexec", *sys.argv[1:]])


if __name__ == "__main__":
    main()
