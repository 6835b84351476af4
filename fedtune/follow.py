"""Following a run for a person: the `flwr run --stream` / `flwr log` output turned into readable lines,
and a live status (round i/N, phase, nodes, loss, MB against the budget) kept at the bottom of the
terminal. Used by `fedtune demo`.

Sources, all optional but the stream: the ServerApp's JSON log lines (fedtune.logs), the run's
results.json (rewritten after every round), and, where the SuperNodes run on this machine, their log
files (what each node is doing inside a round). The raw stream is kept in a file: nothing is lost for
the machines.

On a terminal the status is two live lines (rich): a progress bar over the rounds with the phase, and the
details; elsewhere (pipes, CI) a `[progress]` line is printed
whenever the round or its phase changes.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from fedtune.errors import FedTuneError
from fedtune.report.view import RESULTS_FILE, RunView, load

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Successfully started run (\d+)")
_ROUND = re.compile(r"^\[ROUND (\d+)/(\d+)\]$")
_SENT = re.compile(r"^round (\d+): (?:sent|sending) the global adapter to (\d+) nodes")
_DONE = re.compile(r"^round (\d+): loss ")

# Lines a person does not need (each is in the raw stream file, and what it says is in the status line,
# the round line fedtune prints, or results.json).
_HIDDEN_TEXT = (
    "Starting logstream for run_id",  # flwr CLI
    "Start `flwr-serverapp` process",
    "Successfully installed fedtune to",  # the SuperLink unpacked the app
    "configure_train: Sampled",  # -> status: sampled
    "aggregate_train: Received",  # -> status: phase
    # fedtune's design: no federated evaluation; the model is scored with MMLU after the run
    "fraction_evaluate is set to 0.0",
    # an older ServerApp's unfolded dumps (fedtune.logs folds them at the source now)
    "Aggregated MetricRecord",
)
_TREE = ("├", "└", "│", "\t")

# What a SuperNode's log says about the node's part of a round -> its phase
_NODE_PHASES = (
    ("Receiving: train message", "downloading"),
    ("Received successfully", "starting"),
    ("Sending: train message", "uploading"),
    ("Sent successfully", "done"),
)
_NODE_TRAINED = re.compile(r"^round (\d+): loss [\d.]+ over")


@dataclass
class StreamState:
    """What the stream has told so far."""

    run_id: int | None = None
    round: int = 0
    planned: int | None = None
    phase: str = "starting the ServerApp"
    sampled: int = 0
    finished_rounds: int = 0
    errors: list[str] = field(default_factory=list)


def _clock(timestamp: object) -> str:
    text = str(timestamp or "")
    match = re.search(r"T(\d\d:\d\d:\d\d)", text)
    return match.group(1) if match else time.strftime("%H:%M:%S")


class StreamRenderer:
    """One stream line in, the line to show a person out (or None), updating `state`."""

    def __init__(self) -> None:
        self.state = StreamState()

    def feed(self, raw: str) -> str | None:
        line = _ANSI.sub("", raw.rstrip("\n"))
        if not line.strip():
            return None
        event = _json(line)
        if event is None:
            return self._plain(line)
        return self._event(event)

    def _plain(self, line: str) -> str | None:
        started = _STARTED.search(line)
        if started:
            self.state.run_id = int(started.group(1))
        if any(text in line for text in _HIDDEN_TEXT):
            return None
        return escape(line.strip())

    def _event(self, event: dict[str, Any]) -> str | None:
        text = str(event.get("event", "")).strip()
        level = str(event.get("level", "info")).lower()
        state = self.state
        if m := _ROUND.match(text):
            state.round, state.planned = int(m.group(1)), int(m.group(2))
            state.phase, state.sampled = "sampling nodes", 0
            return None
        if m := _SENT.match(text):
            state.sampled = int(m.group(2))
            state.phase = f"{state.sampled} nodes training"
        elif text.startswith("aggregate_train: Received"):
            state.phase = "aggregating"
        elif m := _DONE.match(text):
            state.finished_rounds = max(state.finished_rounds, int(m.group(1)))
            state.phase = "round done"
        if any(hidden in text for hidden in _HIDDEN_TEXT) or text.startswith(_TREE):
            return None
        if text.startswith("Starting ") and " strategy: " in text:
            text = _strategy_summary(text)
        shown = f"[dim]{_clock(event.get('timestamp'))}[/dim]  "
        body = escape(text)
        if event.get("exception"):
            body += "  " + escape(_exception_line(event["exception"]))
        if level in ("error", "critical", "exception"):
            state.errors.append(text)
            return shown + f"[bold red]error[/bold red] {body}"
        if level == "warning":
            return shown + f"[yellow]warning[/yellow] {body}"
        return shown + body


def _strategy_summary(text: str) -> str:
    """The folded start-up tree without the record keys and empty configs (Flower's internals)."""
    head, _, items = text.partition(": ")
    internal = ("ConfigRecord", "ArrayRecord key", "Weighted by")
    kept = [item for item in items.split("; ") if not item.startswith(internal)]
    return f"{head}: {'; '.join(kept)}"


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


def _exception_line(exception: object) -> str:
    """The last line of a traceback (fedtune.logs renders exceptions as dicts in JSON mode)."""
    if isinstance(exception, list) and exception and isinstance(exception[-1], dict):
        last = exception[-1]
        return f"{last.get('exc_type', '')}: {last.get('exc_value', '')}"
    return str(exception).strip().splitlines()[-1] if str(exception).strip() else ""


class NodeLogs:
    """Follows SuperNode log files on this machine: the phase of each node in the current round."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._offsets = dict.fromkeys(self.paths, 0)
        self.phase: dict[str, str] = {}

    @staticmethod
    def label(path: Path) -> str:
        return path.stem.replace("supernode-", "node ")

    def poll(self) -> dict[str, str]:
        for path in self.paths:
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets[path])
                    data = handle.read()
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1  # a half-written last line waits for the next poll
            self._offsets[path] += complete
            for raw in data[:complete].decode(errors="replace").splitlines():
                self._line(self.label(path), raw)
        return dict(self.phase)

    def _line(self, node: str, raw: str) -> None:
        event = _json(_ANSI.sub("", raw))
        text = str(event.get("event", "")) if event else _ANSI.sub("", raw)
        for marker, phase in _NODE_PHASES:
            if marker in text:
                self.phase[node] = phase
                return
        if event is None:
            return
        if _NODE_TRAINED.match(text):
            self.phase[node] = "trained"
        elif event.get("round") is not None and self.phase.get(node) == "starting":
            self.phase[node] = "training"  # the ClientApp's first line of the round


def status_parts(state: StreamState, view: RunView | None, nodes: dict[str, str]) -> list[str]:
    """round i/N, phase, then the details: node phases, the last round's nodes, loss, MB vs the budget."""
    planned = state.planned or (view.planned_rounds if view else None) or "?"
    current = state.round or (view.last_round + 1 if view and view.rounds else 0)  # the stream knows best
    parts = [f"round {current or '-'}/{planned}", state.phase]
    if nodes:
        parts.append(", ".join(f"{name} {phase}" for name, phase in sorted(nodes.items())))
    if view is not None and view.rounds:
        last = view.rounds[-1]
        parts.append(
            f"round {last.round}: sampled {len(last.sampled)} replied {len(last.replied)} "
            f"failed {len(last.failed)} rejected {len(last.rejected)}"
        )
        loss = next((r.train_loss for r in reversed(view.rounds) if r.train_loss is not None), None)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(
            f"{view.budget_mb:,.2f} MB of the {view.reference_mb:,.2f} MB reference "
            f"(cap {view.budget_limit_mb:,.0f})"
        )
    elif state.sampled:
        parts.append(f"sampled {state.sampled}")
    return parts


def status_text(state: StreamState, view: RunView | None, nodes: dict[str, str]) -> str:
    """The status as one line: round i/N · phase · nodes · loss · MB so far against the budget."""
    return " · ".join(status_parts(state, view, nodes))


class _LiveStatus:
    """Two lines at the bottom of the terminal: spinner, round i/N, a bar, the phase and the time; then the
    details (nodes, loss, MB), cut to the width rather than wrapped."""

    def __init__(self) -> None:
        self.spinner = Spinner("dots")
        self.started = time.monotonic()
        self.parts: list[str] = ["round -/?", "starting"]
        self.done = 0
        self.total: int | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        elapsed = int(time.monotonic() - self.started)
        head = Table.grid(padding=(0, 1))
        head.add_row(
            self.spinner, Text(self.parts[0], style="bold"),
            ProgressBar(total=float(self.total or 1), completed=float(self.done), width=20),
            Text(self.parts[1], overflow="ellipsis", no_wrap=True),
            Text(f"{elapsed // 60}:{elapsed % 60:02d}", style="dim"),
        )
        yield head
        if len(self.parts) > 2:
            yield Text("  " + " · ".join(self.parts[2:]), overflow="ellipsis", no_wrap=True, style="cyan")


class RunFollower:
    """Reads a run's stream to its end, printing the readable lines and keeping the status current."""

    def __init__(
        self,
        console: Console,
        outputs: Path | None = None,
        node_logs: Sequence[Path] = (),
        raw_log: Path | None = None,
        refresh: float = 0.5,
    ) -> None:
        self.console = console
        self.outputs = outputs
        self.nodes = NodeLogs(node_logs)
        self.raw_log = raw_log
        self.refresh = refresh
        self.renderer = StreamRenderer()
        self._results_mtime = 0.0
        self.view: RunView | None = None

    @property
    def state(self) -> StreamState:
        return self.renderer.state

    def _read_results(self) -> None:
        if self.outputs is None or self.state.run_id is None:
            return
        path = self.outputs / str(self.state.run_id) / RESULTS_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if mtime != self._results_mtime:
            try:
                self.view = load(path)
                self._results_mtime = mtime
            except FedTuneError:
                pass  # mid-replace on a filesystem without atomic rename: read it next time

    def follow(self, stream: IO[str]) -> StreamState:
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True, name="flwr-stream").start()
        raw = open(self.raw_log, "a", encoding="utf-8") if self.raw_log else None  # noqa: SIM115
        try:
            if self.console.is_terminal:
                self._follow_live(lines, raw)
            else:
                self._follow_plain(lines, raw)
        finally:
            if raw is not None:
                raw.close()
        return self.state

    def _drain(self, lines: queue.Queue[str | None], raw: IO[str] | None, print_line: Any) -> bool:
        """Handle the lines that arrived within one refresh; False at the end of the stream."""
        deadline = time.monotonic() + self.refresh
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return True
            if line is None:
                return False
            if raw is not None:
                raw.write(line if line.endswith("\n") else line + "\n")
                raw.flush()
            shown = self.renderer.feed(line)
            if shown is not None:
                print_line(shown, soft_wrap=True)
            if time.monotonic() >= deadline:
                return True

    def _status(self) -> str:
        self._read_results()
        return status_text(self.state, self.view, self.nodes.poll())

    def _follow_live(self, lines: queue.Queue[str | None], raw: IO[str] | None) -> None:
        status = _LiveStatus()
        with Live(status, console=self.console, refresh_per_second=4, transient=False) as live:
            while self._drain(lines, raw, live.console.print):
                self._read_results()
                status.parts = status_parts(self.state, self.view, self.nodes.poll())
                status.done = self.view.last_round if self.view else self.state.finished_rounds
                status.total = self.state.planned or (self.view.planned_rounds if self.view else None)
            self._read_results()
            status.done = self.view.last_round if self.view else self.state.finished_rounds
            status.parts = [*status.parts[:1], "stream ended", *status_parts(self.state, self.view, {})[2:]]

    def _follow_plain(self, lines: queue.Queue[str | None], raw: IO[str] | None) -> None:
        last: list[str] = []
        while self._drain(lines, raw, self.console.print):
            status = self._status()
            key = status.split(" · ")[:3]  # round, phase, node phases: not every MB tick
            if key != last:
                self.console.print(f"\\[progress] {escape(status)}", highlight=False, soft_wrap=True)
                last = key

