"""structlog pipeline: JSON lines with bound context for fedtune's and flwr's loggers (fast)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from fedtune.runtime_env import FLWR_QUIET_ENV
from tests.observability.helpers import REPO

SCRIPT = """
import logging
from flwr.common.logger import log
from fedtune.logs import bind, bind_round, configure_logging
configure_logging(run_id=42)
bind(node_id=7)
class S:
    def global_round(self, r): return r + 10
    def configure_train(self, server_round, *a): logging.getLogger("fedtune.strategy").info("configure %d", 1)
s = bind_round(S())
s.configure_train(1)
log(logging.INFO, "from flwr %s", "ok")
log(logging.INFO, "")
logging.getLogger("fedtune.x").warning("warn %s", "w")
"""


def run(fmt: str) -> str:
    env = {"FEDTUNE_LOG_FORMAT": fmt, **FLWR_QUIET_ENV, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_lines_carry_context_for_fedtune_and_flwr():
    lines = [json.loads(line) for line in run("json").splitlines()]
    assert [line["event"] for line in lines] == ["configure 1", "from flwr ok", "warn w"]  # blank dropped
    assert all(line["run_id"] == 42 and line["node_id"] == 7 for line in lines)
    assert lines[0]["round"] == 11  # the run's round (global_round), bound by bind_round
    assert lines[1]["logger"] == "flwr" and lines[1]["level"] == "info"
    assert all("timestamp" in line for line in lines)


def test_console_renderer_is_not_json():
    out = run("console")
    assert "from flwr ok" in out and not out.lstrip().startswith("{")


def test_idempotent():
    from fedtune.logs import configure_logging

    root = logging.getLogger()
    level = root.level
    try:
        configure_logging(fmt="json")
        configure_logging(fmt="json")
        handlers = [h for h in root.handlers if h.get_name() == "fedtune-structlog"]
        assert len(handlers) == 1
    finally:  # leave the pytest process's logging as it was
        for handler in [h for h in root.handlers if h.get_name() == "fedtune-structlog"]:
            root.removeHandler(handler)
        root.setLevel(level)
