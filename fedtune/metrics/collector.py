"""The table (fedtune.metrics.table) as Prometheus families, computed from the state at scrape time.

One run at a time: a run whose file holds something the table cannot read (a list where a number belongs,
say) is left out of that scrape and counted in fedtune_exporter_errors_total{source="collect"}; the other
runs and the exporter's own series are served as usual, and the run comes back when its file is fixed or
gone."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedtune.accounting import REFERENCE_BUDGET_MB
from fedtune.metrics.state import RunView, State, Traffic, run_status
from fedtune.metrics.table import TABLE, MetricDef, RunData

log = logging.getLogger("fedtune.metrics")
Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily
FAMILY: dict[str, type[Family]] = {
    "gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily
}


def _family(metric: MetricDef, labels: list[str]) -> Family:
    return FAMILY[metric.kind](metric.name, metric.help, labels=labels)


def _add(family: Family, metric: MetricDef, labels: tuple[str, ...], values: list[float]) -> None:
    if not isinstance(family, HistogramMetricFamily):
        family.add_metric(list(labels), values[-1])  # a gauge or counter: the latest value
        return
    buckets = [(str(float(b)), float(sum(v <= b for v in values))) for b in metric.buckets]
    family.add_metric(list(labels), buckets=[*buckets, ("+Inf", float(len(values)))], sum_value=sum(values))


def _carried(view: RunView | None, views: dict[str, RunView]) -> int:
    """Rounds a resumed run copied from its predecessor (counted there already, when it is exported)."""
    if view is None or view.results.resumed_from is None:
        return 0
    previous = views.get(str(view.results.resumed_from))
    return len(previous.results.rounds) if previous is not None else 0


def run_samples(run: RunData) -> dict[int, dict[tuple[str, ...], list[float]]]:
    """Every sample of one run by table row; raises when the run's data does not fit the table."""
    rows: dict[int, dict[tuple[str, ...], list[float]]] = {}
    for index, metric in enumerate(TABLE):
        if metric.needs_results and run.view is None:
            continue
        series = rows.setdefault(index, {})
        for labels, value in metric.samples(run):
            series.setdefault((run.run_id, *map(str, labels)), []).append(float(value))
    return rows


class FedTuneCollector(Collector):
    def __init__(self, state: State) -> None:
        self.state = state
        self._reported: set[tuple[str, object]] = set()  # (run id, file version) already logged as bad

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        views, traffic = self.state.snapshot()
        families = [_family(m, ["run_id", *m.labels]) for m in TABLE]
        for run_id in sorted(set(views) | set(traffic)):
            view, flow = views.get(run_id), traffic.get(run_id)
            run = RunData(run_id, view, flow, run_status(view, flow), _carried(view, views))
            try:
                rows = run_samples(run)
            except Exception as err:  # the file is an input: isolate it, keep serving the others
                self._bad_run(run, flow, err)
                continue
            for index, series in rows.items():
                for labels, values in series.items():
                    _add(families[index], TABLE[index], labels, values)
        yield from families
        yield from self._exporter_families()

    def _bad_run(self, run: RunData, flow: Traffic | None, err: Exception) -> None:
        self.state.count_error("collect")
        key = (run.run_id, run.view.stamp if run.view else None)
        if key not in self._reported:
            if len(self._reported) > 1024:
                self._reported.clear()
            self._reported.add(key)
            where = run.view.path if run.view else "the SuperLink"
            log.warning(
                "run %s left out of /metrics: %s: %s (%s)", run.run_id, type(err).__name__, err, where
            )

    def _exporter_families(self) -> Iterator[Metric]:
        reference = GaugeMetricFamily(
            "fedtune_communication_budget_reference_mb",
            "Budget of the FlowerTune reference submission, in MB (for comparison).",
        )
        reference.add_metric([], REFERENCE_BUDGET_MB)
        up = GaugeMetricFamily(
            "fedtune_superlink_up", "1 if the last poll of the SuperLink's Control API succeeded."
        )
        refreshed = GaugeMetricFamily(
            "fedtune_exporter_last_refresh_timestamp_seconds", "Unix time the exporter last scanned results."
        )
        errors = CounterMetricFamily(
            "fedtune_exporter_errors",
            "Errors by source: results (a file that does not parse), superlink (a failed poll), "
            "notify (a refused notification), collect (a run left out of a scrape).",
            labels=["source"],
        )
        with self.state.lock:
            if self.state.superlink_up is not None:
                up.add_metric([], self.state.superlink_up)
            refreshed.add_metric([], self.state.last_refresh)
            for source, count in sorted(self.state.errors.items()):
                errors.add_metric([source], float(count))
        yield from (reference, up, refreshed, errors)
