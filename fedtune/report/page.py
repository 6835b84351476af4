"""report.html: one self-contained page (inline CSS, figures as data: URIs, no external request), so it
opens from a file, an artefact store or a mail attachment. Every figure is followed by the numbers it
draws, in a table whose cells carry the exact values (`data-value`) for scripts and tests."""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable, Sequence

from fedtune.report.figures import FIGURES
from fedtune.report.view import MB, PHASES, RunView

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
  color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.status { padding: .1em .5em; border-radius: .3em; color: #fff; font-size: .8em; vertical-align: middle; }
.completed { background: #2e7d32; } .failed { background: #c62828; } .running { background: #1565c0; }
.unknown { background: #666; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .2em 1.2em; }
dl.summary dt { color: #555; } dl.summary dd { margin: 0; font-variant-numeric: tabular-nums; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(30em, 1fr)); gap: 1.5em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: .3em; }
table { border-collapse: collapse; margin-top: .5em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .2em .6em; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
details summary { cursor: pointer; color: #555; margin-top: .4em; }
code { background: #f4f4f4; padding: 0 .3em; word-break: break-all; }
.error { color: #c62828; } footer { margin-top: 3em; color: #777; font-size: .85em; }
"""
# Marks each figure once the browser has decoded it: a headless browser's DOM dump then shows that the
# images really render (the page needs no script to be read).
_SCRIPT = """
window.addEventListener('load', () => document.querySelectorAll('figure img').forEach(
  img => img.dataset.rendered = String(img.complete && img.naturalWidth > 0)));
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: object, shown: str | None = None, key: str | None = None, text: bool = False) -> str:
    attrs = f' data-key="{_e(key)}"' if key else ""
    if value is not None and (key or not isinstance(value, str)):
        attrs += f' data-value="{_e(value)}"'
    cls = ' class="text"' if text else ""
    return f"<td{cls}{attrs}>{_e(shown if shown is not None else ('n/a' if value is None else value))}</td>"


def _table(table_id: str, headers: Sequence[str], rows: Iterable[str], text_columns: int = 0) -> str:
    head = "".join(
        f'<th class="text">{_e(h)}</th>' if i < text_columns else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _summary(view: RunView) -> str:
    last_loss = next((r.train_loss for r in reversed(view.rounds) if r.train_loss is not None), None)
    sent_mb = view.raw.get("sent_mb")
    items = [
        ("model", _e(view.model)),
        ("rounds finished", f"{view.last_round} of {view.planned_rounds or '?'}"),
        ("communication budget",
         f'<span id="budget-mb" data-value="{view.budget_mb}">{view.budget_mb:,.2f} MB</span> — '
         f"{100 * view.budget_mb / view.reference_mb:.2f} % of the FlowerTune reference "
         f"({view.reference_mb:,.2f} MB), {100 * view.budget_mb / view.budget_limit_mb:.4f} % of the cap "
         f"({view.budget_limit_mb:,.0f} MB)"),
    ]
    if isinstance(sent_mb, (int, float)) and sent_mb > 0:
        items.append(("sent (packed transport)", f"{sent_mb:,.2f} MB"))
    items += [
        ("last train loss", "n/a" if last_loss is None else f"{last_loss:.4f}"),
        ("final adapter", f'<code id="final-adapter">{_e(view.final_adapter)}</code>'
         if view.final_adapter else "none (the run did not finish)"),
        ("started / finished", f"{_e(view.started_at or '?')} / {_e(view.finished_at or '—')}"),
        ("run folder", f"<code>{_e(view.run_dir)}</code>"),
    ]
    if view.error:
        items.append(("error", f'<span class="error" id="run-error">{_e(view.error)}</span>'))
    return '<dl class="summary">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _figure_data(name: str, view: RunView) -> str:
    """The numbers a figure draws, as a table under it."""
    if name == "loss":
        rows = (_cell(r.round, key="round") + _cell(r.train_loss, _num(r.train_loss, 4), "train_loss")
                for r in view.rounds)
        return _table("data-loss", ["round", "train loss"], rows)
    if name == "budget":
        rows = (_cell(r.round, key="round") + _cell(r.total_mb, _num(r.total_mb), "round_mb")
                + _cell(r.budget_mb, _num(r.budget_mb), "budget_mb") for r in view.rounds)
        return _table("data-budget", ["round", "this round MB", "cumulative MB"], rows)
    if name == "node_bytes":
        rows = (_cell(n.label, text=True) + _cell(n.node_id, key="node_id", text=True)
                + _cell(n.down_bytes, _num(n.down_bytes / MB), "down_bytes")
                + _cell(n.up_bytes, _num(n.up_bytes / MB), "up_bytes") + _cell(n.rounds, key="rounds")
                + _cell(n.failed, key="failed") + _cell(n.rejected, key="rejected") for n in view.nodes)
        return _table("data-node_bytes",
                      ["node", "node id", "down MB", "up MB", "rounds", "failed", "rejected"], rows, 2)
    rows = (_cell(r.round, key="round")
            + "".join(_cell(r.phases[key], _num(r.phases[key], 1), key) for key, _ in PHASES)
            + _cell(r.duration_s, _num(r.duration_s, 1), "duration_s")
            + _cell(r.checkpoint_s, _num(r.checkpoint_s, 1), "checkpoint_s") for r in view.rounds)
    return _table("data-phases",
                  ["round", *(label for _, label in PHASES), "round s", "checkpoint s (background)"], rows)


def _figures(view: RunView, pngs: dict[str, bytes]) -> str:
    parts = []
    for name, title in FIGURES.items():
        uri = "data:image/png;base64," + base64.b64encode(pngs[name]).decode("ascii")
        parts.append(
            f'<figure id="fig-{name}"><figcaption>{_e(title)}</figcaption>'
            f'<img src="{uri}" alt="{_e(title)}" data-file="{name}.png">'
            f"<details><summary>numbers</summary>{_figure_data(name, view)}</details></figure>"
        )
    return '<div class="figures">' + "".join(parts) + "</div>"


def _rounds(view: RunView) -> str:
    rows = []
    for r in view.rounds:
        rejected = "; ".join(f"{n}: {why}" for n, why in r.rejected.items())
        rows.append(
            _cell(r.round, key="round") + _cell(r.train_loss, _num(r.train_loss, 4), "train_loss")
            + _cell(len(r.sampled), key="sampled") + _cell(len(r.replied), key="replied")
            + _cell(len(r.failed), key="failed") + _cell(len(r.rejected), key="rejected")
            + _cell("yes" if r.aggregated else "no", key="aggregated", text=True)
            + _cell(r.down_bytes, _num(r.down_bytes / MB), "down_bytes")
            + _cell(r.up_bytes, _num(r.up_bytes / MB), "up_bytes")
            + _cell(r.budget_mb, _num(r.budget_mb), "budget_mb")
            + _cell(r.duration_s, _num(r.duration_s, 1), "duration_s")
            + _cell(rejected or "", text=True)
        )
    return _table(
        "rounds",
        ["round", "train loss", "sampled", "replied", "failed", "rejected", "aggregated", "down MB",
         "up MB", "budget MB", "seconds", "rejections"],
        rows,
    )


def _problems(view: RunView) -> str:
    items = []
    for r in view.rounds:
        items += [f"<li>round {r.round}: node {_e(n)} failed (no usable reply)</li>" for n in r.failed]
        items += [f"<li>round {r.round}: node {_e(n)} rejected — {_e(why)}</li>"
                  for n, why in r.rejected.items()]
    body = "".join(items) if items else "<li>none: every sampled node replied and was accepted</li>"
    return f'<ul id="problems" data-count="{len(items)}">{body}</ul>'


def _eval(view: RunView) -> str:
    if view.eval is None:
        adapter = view.final_adapter or "RUN_DIR/adapter"
        return (f'<p id="eval-missing">No evaluation in this folder yet: '
                f"<code>fedtune eval --adapter {_e(adapter)}</code> writes one into "
                f"<code>{_e(view.run_dir / 'eval')}</code>; then <code>fedtune report</code> again.</p>")
    ev = view.eval
    rows = (_cell(name, text=True) + "".join(_cell(a, "n/a" if a is None else f"{100 * a:.2f}")
                                              for a in accs)
            + _cell(avg, "n/a" if avg is None else f"{100 * avg:.2f}") for name, accs, avg in ev.rows)
    note = f"<p>MMLU, {ev.num_questions} questions from {_e(ev.source)}; accuracy in %.</p>"
    return note + _table("eval", ["", *ev.categories, "Average"], rows, 1)


def render(view: RunView, pngs: dict[str, bytes]) -> str:
    status = view.status if view.status in ("completed", "failed", "running") else "unknown"
    checkpoints = [r.checkpoint for r in view.rounds if r.checkpoint]
    sections = [
        f"<h1>fedtune run {_e(view.run_id)} <span class=\"status {status}\" id=\"status\">"
        f"{_e(view.status)}</span></h1>",
        _summary(view),
        "<h2>Figures</h2>", _figures(view, pngs),
        "<h2>Rounds</h2>", _rounds(view),
        "<h2>Failed and rejected nodes</h2>", _problems(view),
        "<h2>Adapter</h2>",
        f"<p>Final global adapter: <code>{_e(view.final_adapter or 'none')}</code></p>"
        + (f"<p>Checkpoints: {', '.join(f'<code>{_e(c)}</code>' for c in checkpoints)}</p>"
           if checkpoints else ""),
        "<h2>Evaluation</h2>", _eval(view),
        f"<footer>Written by fedtune report at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} "
        f"from <code>{_e(view.run_dir / 'results.json')}</code>.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedtune run {_e(view.run_id)} — {_e(view.status)}</title>"
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>"
        + "\n".join(sections) + "</body></html>\n"
    )
