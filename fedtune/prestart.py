"""A SuperExec that starts each app process before its task: a ClientApp before its message, a ServerApp
before its run (fedtune/prestart_worker.py).

Flower 1.42's SuperExec asks its executor to start a fresh `flwr-clientapp` / `flwr-serverapp` for every
task, so each message pays a Python start and Flower's imports (1-1.5 s) and each run its ServerApp's
imports (torch, transformers, peft: 15-21 s on an H200 host) before any work. This executor keeps one
worker waiting — Python started, the imports done — and hands it the next task's token, then starts the
next worker at once, so it is ready however soon the next task comes (waiting for the task's process to
end first left the next round cold whenever its message came while that process was still exiting). The
imports overlap training or idle time. Everything else is Flower's: the SuperExec's poll loop, the app's
`run_clientapp` / `run_serverapp`, the Runtime API. A task the worker cannot take (another task type,
other TLS settings, hidden output, a worker that died) is started cold, as Flower does.

`python -m fedtune.prestart clientapp|serverapp ARGS` is `flower-superexec ARGS` with this executor for
`flwr-clientapp` or `flwr-serverapp` tasks under the local (subprocess) executor type; each role's
`flower_entry` starts it in place of `flower-superexec` (`prestarting_subprocess`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import IO, Any

log = logging.getLogger("fedtune.prestart")

MODULE = "fedtune.prestart"
WORKER_MODULE = "fedtune.prestart_worker"
# flwr.supercore.constant.TaskType values: the app CLI each task would start cold, and what it is called
TASKS = {"flwr-clientapp": "ClientApp", "flwr-serverapp": "ServerApp"}
# The SuperExec's own argument is the task type without "flwr-", so `pgrep -f flwr-serverapp` (or a test's
# kill) finds the app processes, running or waiting, and never the SuperExec that starts them.
ROLES = {task.removeprefix("flwr-"): task for task in TASKS}
# A worker that dies this soon after its start is broken (e.g. an import fails): stop prestarting after
# MAX_QUICK_DEATHS of those in a row and start every task cold, so a broken install cannot spin.
QUICK_DEATH_S = 10.0
MAX_QUICK_DEATHS = 3


SETTINGS_COMPARED = (
    "suppress_output", "runtime_api_address", "insecure", "root_certificates_path",
    "runtime_dependency_install",
)


@dataclass(frozen=True)
class WorkerSettings:
    """What a prestarted worker was started with; a task with other settings is started cold."""

    task_type: str  # a key of TASKS
    suppress_output: bool  # Flower's choice per task type: a ServerApp's output goes to `flwr log` only
    runtime_api_address: str
    insecure: bool
    root_certificates_path: str | None
    runtime_dependency_install: bool
    parent_pid: int

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", WORKER_MODULE, self.task_type,
               "--runtime-api-address", self.runtime_api_address, "--parent-pid", str(self.parent_pid)]
        if self.insecure:
            cmd.append("--insecure")
        elif self.root_certificates_path is not None:
            cmd += ["--root-certificates", self.root_certificates_path]
        if self.runtime_dependency_install:
            cmd.append("--allow-runtime-dependency-installation")
        return cmd

    def mismatch(self, spec: Any) -> str | None:
        """Why a worker started with these settings cannot take `spec`'s task (None: it can)."""
        if str(spec.task_type) != self.task_type:
            return f"task type {spec.task_type}"
        for name in SETTINGS_COMPARED:
            if getattr(spec, name) != getattr(self, name):
                return f"{name} {getattr(spec, name)!r} (the worker's: {getattr(self, name)!r})"
        return None

    def matches(self, spec: Any) -> bool:
        return self.mismatch(spec) is None


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    started: float

    @property
    def stdin(self) -> IO[bytes]:
        assert self.process.stdin is not None
        return self.process.stdin


class PrestartingExecutor:
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

        mismatch = self.settings.mismatch(spec)
        if mismatch is not None and str(spec.task_type) == self.settings.task_type:
            log.info("%s task started cold: its %s", TASKS[self.settings.task_type], mismatch)
        worker = self._take_idle() if mismatch is None else None
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
        quiet = subprocess.DEVNULL if self.settings.suppress_output else None  # as Flower's executor does
        process = subprocess.Popen(self.settings.command(), stdin=subprocess.PIPE, stdout=quiet, stderr=quiet)
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
        app = TASKS[self.settings.task_type]
        log.warning("prestarted %s worker exited (code %s) before its task", app, worker.process.returncode)
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.warning("%s workers keep dying at start: every task now starts a cold %s", app,
                        self.settings.task_type)

    @staticmethod
    def _reap(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prestarting_subprocess(task_type: str) -> SimpleNamespace:
    """The `subprocess` module as a role's Flower code sees it: `flower-superexec` becomes
    `python -m fedtune.prestart TASK` with the same arguments, every other command is left alone."""

    def popen(command: Any, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        if isinstance(command, list) and command[:1] == ["flower-superexec"]:
            command = [sys.executable, "-m", MODULE, task_type.removeprefix("flwr-"), *command[1:]]
        return subprocess.Popen(command, *args, **kwargs)

    module = SimpleNamespace(**{name: getattr(subprocess, name) for name in dir(subprocess)
                                if not name.startswith("__")})
    module.Popen = popen
    return module


def main(argv: list[str] | None = None) -> None:
    """`flower-superexec` (Flower's CLI and loop) with the prestarting executor for local TASK tasks."""
    import importlib

    from flwr.supercore.constant import ExecutorType, TaskType
    from flwr.supercore.superexec.executor import SubprocessExecutor
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    # the modules, not the functions of the same names their packages export
    cli: Any = importlib.import_module("flwr.supercore.cli.flower_superexec")
    loop: Any = importlib.import_module("flwr.supercore.superexec.run_superexec")
    flower_get_executor, flower_run = loop.get_executor, loop.run_superexec
    args = list(argv if argv is not None else sys.argv[1:])
    if not args or args[0] not in ROLES:
        raise SystemExit(f"usage: python -m {MODULE} {{{','.join(ROLES)}}} FLOWER_SUPEREXEC_ARGS...")
    task_type, flower_args = ROLES[args[0]], args[1:]

    def run(**kwargs: Any) -> None:
        def get_executor(executor_type: Any, *args: Any, **options: Any) -> Any:
            if executor_type != ExecutorType.SUBPROCESS:
                return flower_get_executor(executor_type, *args, **options)
            settings = WorkerSettings(
                task_type=task_type,
                suppress_output=TaskType(task_type) not in AutoExecPlugin.visible_output_task_types,
                runtime_api_address=kwargs["runtime_api_address"],
                insecure=kwargs["insecure"],
                root_certificates_path=kwargs.get("root_certificates_path"),
                runtime_dependency_install=kwargs.get("runtime_dependency_install", False),
                parent_pid=os.getpid(),
            )
            return PrestartingExecutor(settings, SubprocessExecutor())

        loop.get_executor = get_executor
        flower_run(**kwargs)

    cli.run_superexec = run
    from fedtune.logs import run_with_logging

    run_with_logging(cli.flower_superexec, ["flower-superexec", *flower_args])


if __name__ == "__main__":
    main()
