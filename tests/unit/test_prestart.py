"""The prestarting SuperExec executor (fedtune/prestart.py) with real worker processes and Flower's own
ExecutionSpec and SubprocessExecutor. The handover inside a real federation is checked end to end in
tests/e2e/test_federation.py (every round's ClientApp and the run's ServerApp were prestarted ones)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor

from fedtune.prestart import PrestartingExecutor, WorkerSettings, prestarting_subprocess
from tests.host import processes_mentioning

ADDRESS = "127.0.0.1:1"  # nothing listens: a task handed to a worker here fails, which these tests never do


def settings(**overrides: object) -> WorkerSettings:
    values: dict[str, object] = {"task_type": "flwr-clientapp", "suppress_output": False,
                                 "runtime_api_address": ADDRESS, "insecure": True, "root_certificates_path": None,
                                 "runtime_dependency_install": False, "parent_pid": os.getpid()}
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


def spec(token: str = "token-1", **overrides: object) -> ExecutionSpec:
    values: dict[str, object] = {
        "task_type": TaskType.CLIENT_APP, "runtime_api_address": ADDRESS, "token": token, "insecure": True,
        "root_certificates_path": None, "runtime_dependency_install": False, "parent_pid": os.getpid(),
        "suppress_output": False, "task_id": 1,
    }
    values.update(overrides)
    return ExecutionSpec(**values)  # type: ignore[arg-type]


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_only_clientapp_tasks_with_the_workers_own_settings_are_handed_over():
    worker = settings()
    assert worker.matches(spec())
    assert not worker.matches(spec(task_type=TaskType.SERVER_APP))
    serverapps = settings(task_type="flwr-serverapp", suppress_output=True)
    assert serverapps.matches(spec(task_type=TaskType.SERVER_APP, suppress_output=True))
    assert not serverapps.matches(spec()) and not serverapps.matches(spec(task_type=TaskType.SERVER_APP))
    assert not worker.matches(spec(suppress_output=True))
    assert not worker.matches(spec(runtime_api_address="127.0.0.1:2"))
    assert not worker.matches(spec(insecure=False, root_certificates_path="/ca.crt"))
    assert not worker.matches(spec(runtime_dependency_install=True))


def test_worker_command_carries_the_tls_choice():
    assert "--insecure" in settings().command()
    secure = settings(insecure=False, root_certificates_path="/etc/ca.crt").command()
    assert secure[secure.index("--root-certificates") + 1] == "/etc/ca.crt" and "--insecure" not in secure
    assert secure[:4] == [sys.executable, "-m", "fedtune.prestart_worker", "flwr-clientapp"]


def test_an_idle_worker_waits_and_exits_cleanly_when_closed():
    executor = PrestartingExecutor(settings(), SubprocessExecutor())
    assert executor.idle is not None
    process = executor.idle.process
    time.sleep(1.0)
    assert process.poll() is None  # imported and waiting for a token
    executor.close()
    assert process.returncode == 0  # EOF on stdin: no task, a quiet exit


def test_a_dead_worker_is_replaced_and_its_task_started_cold(monkeypatch):
    # Flower's cold start runs `flwr-clientapp` from PATH, as the SuperNode's environment has it
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    executor = PrestartingExecutor(settings(), SubprocessExecutor())
    try:
        assert executor.idle is not None
        first = executor.idle.process
        first.kill()
        first.wait()
        token = f"cold-token-{os.getpid()}"
        result = executor.launch(spec(token))  # the worker is dead: Flower's own cold start takes the task
        assert str(result.status) == "accepted"
        assert executor.handed_over == 0
        assert wait_until(lambda: processes_mentioning(f"--token {token}") != [])  # a `flwr-clientapp --token`
        for pid in processes_mentioning(f"--token {token}"):
            os.kill(pid, 9)
        executor.reconcile()
        assert executor.idle is not None and executor.idle.process.pid != first.pid
        assert executor.idle.process.poll() is None
    finally:
        executor.close()


def test_workers_that_die_at_start_stop_the_prestarting():
    broken = settings(parent_pid=1)  # not its parent: each worker stops within its 2 s parent check
    executor = PrestartingExecutor(broken, SubprocessExecutor())
    try:
        for _ in range(5):
            assert executor.idle is None or wait_until(lambda: executor.idle.process.poll() is not None)
            executor.reconcile()
        assert executor.quick_deaths >= 3 and executor.idle is None
    finally:
        executor.close()


def test_a_serverapp_worker_imports_torch_ahead_and_exits_cleanly_when_closed():
    executor = PrestartingExecutor(settings(task_type="flwr-serverapp", suppress_output=True), SubprocessExecutor())
    try:
        assert executor.idle is not None
        process = executor.idle.process
        # imports done, it blocks reading its token from stdin, torch loaded
        assert wait_until(lambda: reading_stdin(process.pid), timeout=120), "the worker never got ready"
        assert "torch" in maps_of(process.pid), "torch not imported ahead"
    finally:
        executor.close()
    assert process.returncode == 0


def reading_stdin(pid: int) -> bool:
    """Blocked in read(0, …): /proc/PID/syscall is "NR fd …" (read is 0 on x86-64, 63 on arm64)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("0", "63") and fields[1] == "0x0"


def maps_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_the_superexec_becomes_the_prestarting_one():
    module = prestarting_subprocess("flwr-clientapp")
    done = module.Popen(["flower-superexec", "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    output, _ = done.communicate(timeout=60)
    assert done.returncode == 0, output
    assert b"--runtime-api-address" in output  # Flower's own SuperExec CLI
    assert module.run is subprocess.run  # everything else is the subprocess module
    # `pgrep -f flwr-clientapp` (a test's kill) finds app processes, never the SuperExec that starts them
    assert done.args[:4] == [sys.executable, "-m", "fedtune.prestart", "clientapp"]
    assert "flwr-clientapp" not in " ".join(done.args)
