"""Logs for people and for machines: JSON where machines read, console on a terminal, Flower's dumps folded,
the known notices silenced (and nothing else)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap

from tests.conftest import REPO

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env or ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON, or this raises


def test_flower_strategy_dumps_are_folded_into_readable_lines():
    out = python("""
        import io
        from logging import INFO, getLogger
        from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
        from flwr.common.logger import log
        from flwr.serverapp.strategy import FedAvg, Result
        from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
        from fedtune.logs import configure_logging

        configure_logging(fmt="json")
        strategy = FedAvg(fraction_evaluate=0.0)
        # what Strategy.start logs (flwr 1.42): the start-up tree, each round's aggregate, the final dump
        log(INFO, "Starting %s strategy:", "FedAvg")
        log_strategy_start_info(3, ArrayRecord(), ConfigRecord(), None)
        strategy.summary()
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", 1, 3)
        metrics = MetricRecord({"train-loss": 1.25, "time-data": 2.75})
        log(INFO, "\\t└──> Aggregated MetricRecord: %s", metrics)
        getLogger("fedtune.strategy").info("round 1: loss 1.2500")
        result = Result(train_metrics_clientapp={1: metrics})
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\\t%s", line.strip("\\n"))
        log(INFO, "")
        getLogger("fedtune.serverapp").info("run completed")
    """)
    events = [e["event"] for e in json_lines(out)]
    starts = [e for e in events if e.startswith("Starting FedAvg strategy:")]
    assert len(starts) == 1 and "Number of rounds: 3" in starts[0] and "Minimum available nodes" in starts[0]
    assert not [e for e in events if e.startswith(("├", "└", "│", "\t"))], events
    assert not [e for e in events if "time-data" in e or "Aggregated MetricRecord" in e], events
    assert events[-3:] == ["[ROUND 1/3]", "round 1: loss 1.2500", "run completed"], events


def test_known_notices_are_silenced_and_other_warnings_are_not():
    out = python("""
        import logging, warnings
        from fedtune.logs import configure_logging
        configure_logging(fmt="json")
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
        model.gradient_checkpointing_enable()  # transformers 5: a FutureWarning peft/trl trigger each round
        _ = model.is_gradient_checkpointing
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no kernels")
        warnings.warn("a warning nobody silenced", FutureWarning)
    """)
    events = [e["event"] for e in json_lines(out)]
    assert not [e for e in events if "gradient_checkpointing" in e or "gemm_4bit" in e], events
    assert any("a warning nobody silenced" in e for e in events), events


def _on_a_terminal(env: dict[str, str]) -> str:
    main, child = pty.openpty()
    code = "from fedtune.logs import configure_logging; import logging; configure_logging(); " \
           "logging.getLogger('fedtune.x').info('hello there')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=child, stderr=child, cwd=REPO, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_format_follows_the_reader():
    env = {k: v for k, v in ENV.items() if k not in ("CI", "FEDTUNE_LOG_FORMAT", "KUBERNETES_SERVICE_HOST")}
    console = _on_a_terminal(env)
    assert "hello there" in console and '"event"' not in console  # a person at a terminal
    ci = _on_a_terminal({**env, "CI": "1"})
    assert '"event": "hello there"' in ci  # CI (or a container) reads JSON even on a TTY
    asked = _on_a_terminal({**env, "FEDTUNE_LOG_FORMAT": "json"})
    assert '"event": "hello there"' in asked
    piped = python("from fedtune.logs import configure_logging; import logging; configure_logging(); "
                   "logging.getLogger('fedtune.x').info('hello there')", env)
    assert json_lines(piped)[0]["event"] == "hello there"
