"""One logging pipeline for every fedtune process: structlog, JSON lines (or a console renderer on a TTY).

`configure_logging()` is called once at each entry point (launchers, ServerApp `main`, ClientApp `train`,
the metrics exporter). It routes three sources through the same structlog processors:

- fedtune's own stdlib loggers (`logging.getLogger("fedtune.…")`, %-style messages, unchanged);
- structlog loggers (`structlog.get_logger()`), with key/value events;
- flwr's stdlib logger `flwr`: its own console handler is replaced, so its lines are JSON too.

Context bound with `bind(run_id=…, round=…, node_id=…)` (contextvars) is added to every line, whatever
logger emitted it. Environment:
  FEDTUNE_LOG_FORMAT  json | console | auto (default: console on a TTY, JSON otherwise and always under
                      CI or in a Kubernetes pod); `flwr` leaves the SuperLink/SuperNode processes in
                      flwr's own format

Flower's multi-line dumps are folded on the way out (`_FlowerFolder`): the strategy's start-up tree becomes
one line, the per-round "Aggregated MetricRecord" and the end-of-run "Final results" dump (one dict key
per line) are dropped, because fedtune's own round and run lines say the same and results.json has all
of it. Known third-party notices that ask nothing of the user are silenced in `quiet_third_party()`,
each with its reason.
  FEDTUNE_LOG_LEVEL   default: FLWR_LOG_LEVEL, else INFO

`python -m fedtune.logs PROGRAM ARGS…` runs a console script (e.g. flower-superlink) in this process with
the pipeline installed: the launchers exec it so the SuperLink's and SuperNode's own lines are JSON too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog
import structlog.tracebacks
from structlog.contextvars import bind_contextvars, clear_contextvars, unbind_contextvars

__all__ = [
    "bind",
    "bind_round",
    "clear",
    "configure_logging",
    "get_logger",
    "unbind",
]

FORMAT_ENV = "FEDTUNE_LOG_FORMAT"
LEVEL_ENV = "FEDTUNE_LOG_LEVEL"
_HANDLER_NAME = "fedtune-structlog"

bind = bind_contextvars
unbind = unbind_contextvars
clear = clear_contextvars


_TREE = ("├", "└", "│")


def _tree_item(text: str) -> str:
    return text.strip().lstrip("├└│─> \t").strip()


class _FlowerFolder:
    """Folds flwr's multi-record dumps (see the module doc) into what a reader needs: feed() takes one
    record and returns the records to write (none, the same, or a folded one first)."""

    def __init__(self) -> None:
        self._tree: logging.LogRecord | None = None  # "Starting X strategy:" while its tree follows
        self._items: list[str] = []
        self._dropping = False  # inside the "Final results:" dump

    def feed(self, record: logging.LogRecord) -> list[logging.LogRecord]:
        if not record.name.startswith("flwr"):
            return [*self._flush(), record]
        text = record.getMessage()
        nested = text.startswith(("\t", " ", *_TREE))
        if self._dropping:
            if nested:
                return []
            self._dropping = False
        if self._tree is not None:
            if nested:
                item = _tree_item(text)
                if item and not item.endswith(":"):  # "Sampling:" and such only head a group
                    self._items.append(item)
                return []
            return [*self._flush(), *self.feed(record)]
        if text.startswith("Starting ") and text.endswith(" strategy:"):
            self._tree, self._items = record, []
            return []
        if text == "Final results:":
            self._dropping = True  # Result.__str__, one key per record; results.json has it all
            return []
        if "Aggregated MetricRecord" in text:
            return []  # fedtune's "round N: loss …" line says it with units
        return [record]

    def _flush(self) -> list[logging.LogRecord]:
        if self._tree is None:
            return []
        folded = logging.makeLogRecord(self._tree.__dict__)
        folded.msg = self._tree.getMessage().rstrip(":") + ": " + "; ".join(self._items)
        folded.args = None
        folded.__dict__.pop("message", None)  # a formatter's cache of the old text
        self._tree, self._items = None, []
        return [folded]


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at emit time (flwr mirrors/redirects stdout for `flwr log`)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.folder = _FlowerFolder()

    def emit(self, record: logging.LogRecord) -> None:
        for out in self.folder.feed(record):
            super().emit(out)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def machine_readers() -> bool:
    """A CI runner or a Kubernetes pod: the output goes to a log collector even when a TTY is attached.
    (Other containers: no TTY unless someone asked for one with `docker run -t`, i.e. a person.)"""
    return bool(os.environ.get("CI")) or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _use_json(fmt: str | None) -> bool:
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "auto").strip().lower()
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    if machine_readers():
        return True
    isatty = getattr(sys.stdout, "isatty", None)
    return not (isatty is not None and isatty())


def _level(level: int | str | None) -> int:
    value = level or os.environ.get(LEVEL_ENV) or os.environ.get("FLWR_LOG_LEVEL") or "INFO"
    if isinstance(value, int):
        return value
    resolved = logging.getLevelName(str(value).strip().upper())
    return resolved if isinstance(resolved, int) else logging.INFO


def _not_blank(record: logging.LogRecord) -> bool:
    """flwr logs blank separator lines: keep every JSON line meaningful."""
    return not (isinstance(record.msg, str) and not record.getMessage().strip())


def _strip(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if isinstance(event.get("event"), str):
        event["event"] = event["event"].strip()
    return event


def configure_logging(
    level: int | str | None = None,
    fmt: str | None = None,
    **context: Any,
) -> None:
    """Install the pipeline (idempotent) and bind `context` (e.g. run_id=…, node_id=…)."""
    json_output = _use_json(fmt)
    shared: list[Callable[..., Any]] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Callable[..., Any]
    if json_output:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Callable[..., Any]] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
        tail = []

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _strip,
            *tail,
            renderer,
        ],
    )
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = _StdoutHandler()
        handler.set_name(_HANDLER_NAME)
        handler.addFilter(_not_blank)
        root.addHandler(handler)
    handler.setFormatter(formatter)
    lvl = _level(level)
    root.setLevel(lvl)
    _route_flwr(lvl)
    logging.captureWarnings(True)  # Python warnings (transformers, bitsandbytes) become log lines too
    quiet_third_party()
    if json_output:
        _no_progress_bars()
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    if context:
        bind_contextvars(**context)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(fragment in text for fragment in self.fragments)


def quiet_third_party() -> None:
    """Silence notices that ask nothing of the user (idempotent; also run when this module is imported,
    before bitsandbytes is). Each has its reason here; everything else stays visible."""
    import warnings

    # transformers 5 renamed gradient checkpointing to "activation checkpointing"; peft 0.21 and trl 1.16
    # (pinned) still call the old names in every round. Nothing to change on our side until they follow.
    for old in ("gradient_checkpointing_enable", "is_gradient_checkpointing"):
        warnings.filterwarnings("ignore", message=f"`{old}` is deprecated", category=FutureWarning)
    # bitsandbytes on CPUs with AVX512-BF16 tries an optional faster kernel from the Hugging Face hub
    # (`kernels` package); no hub is reachable by design, and its own CPU kernel is used instead.
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in bnb.filters):
        bnb.addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))


def _no_progress_bars() -> None:
    """tqdm bars (datasets, transformers) are not log lines: off when logging JSON."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _route_flwr(level: int) -> None:
    """flwr's logger has its own console handler (added when flwr is imported): ours replaces it.

    Call configure_logging() after flwr is imported (entry points are: flwr runs them)."""
    flwr_logger = logging.getLogger("flwr")
    for handler in list(flwr_logger.handlers):
        if type(handler).__name__ == "ConsoleHandler":
            flwr_logger.removeHandler(handler)
    flwr_logger.propagate = True
    flwr_logger.setLevel(level)


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A structlog logger (stdlib-backed) with `context` bound."""
    logger = structlog.get_logger(name)
    return logger.bind(**context) if context else logger


def bind_round(strategy: Any) -> Any:
    """Bind `round` for every log line emitted while `strategy` works on a round (FedAvg API).

    Wraps the instance's configure_/aggregate_ train/evaluate methods; `global_round` (FedTuneAvg) maps
    Flower's per-`start` round to the run's round after a resume."""
    to_global = getattr(strategy, "global_round", lambda r: r)
    for name in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"):
        method = getattr(strategy, name, None)
        if method is None:
            continue

        def wrapped(server_round: int, *args: Any, __method: Any = method, **kwargs: Any) -> Any:
            bind_contextvars(round=int(to_global(server_round)))
            return __method(server_round, *args, **kwargs)

        setattr(strategy, name, wrapped)
    return strategy


def flwr_format() -> bool:
    """FEDTUNE_LOG_FORMAT=flwr: flwr's programs keep flwr's own log format (this pipeline stays out)."""
    return os.environ.get(FORMAT_ENV, "").strip().lower() == "flwr"


def exec_args(executable: str, cmd: list[str]) -> tuple[str, list[str]]:
    """(path, argv) for os.execve: run console script `cmd[0]` through this pipeline (flwr's lines become
    JSON too). FEDTUNE_LOG_FORMAT=flwr keeps flwr's own format (exec the program directly)."""
    if flwr_format():
        return executable, cmd
    return sys.executable, [sys.executable, "-m", "fedtune.logs", executable, *cmd[1:]]


def _adopt_after_dict_config(names: tuple[str, ...]) -> None:
    """flwr hands uvicorn a logging dictConfig with its own handlers: re-route those loggers to ours
    after any dictConfig call (the HTTP server's lines become JSON too)."""
    import logging.config

    original = logging.config.dictConfig

    def dict_config(config: Any) -> None:
        original(config)
        for name in names:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True

    logging.config.dictConfig = dict_config


def _run_console_script(argv: list[str]) -> None:
    """Run console script `argv[0]` (an installed entry point) in-process with logging configured."""
    from importlib.metadata import entry_points

    if not argv:
        raise SystemExit("usage: python -m fedtune.logs PROGRAM [ARGS...]")
    name = os.path.basename(argv[0])
    matches = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not matches:
        os.execvp(argv[0], argv)  # not a Python entry point: run it as is
    # loading imports flwr (which adds its console handler) before we replace it
    run_with_logging(matches[0].load(), argv)


def run_with_logging(main: Any, argv: list[str]) -> None:
    """Call an already imported console-script `main` with argv, its logs through this pipeline
    (FEDTUNE_LOG_FORMAT=flwr: in flwr's own format)."""
    if not flwr_format():
        configure_logging()
        _adopt_after_dict_config(("uvicorn", "uvicorn.error", "uvicorn.access"))
    sys.argv = [argv[0], *argv[1:]]
    result = main()
    raise SystemExit(result if isinstance(result, int) else 0)


quiet_third_party()

if __name__ == "__main__":
    _run_console_script(sys.argv[1:])
