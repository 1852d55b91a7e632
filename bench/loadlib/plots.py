"""The pictures: matplotlib on the Agg backend (no display), imported only when plotting.

- ``throughput.png``: accepted and delivered per second, and the backlog, with faults marked;
- ``tokens.png``: each token's deliveries per second, stacked;
- ``latency.png``: accept→delivered latency, histogram and CDF with p50/p95/p99;
- ``overview.png``: the three panels in one picture (what the README shows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import percentiles

EVENT_COLOURS = {"kill": "#d62728", "restart": "#2ca02c", "partition": "#9467bd", "flood": "#ff7f0e",
                 "revoke": "#8c564b"}
SPAN_KINDS = ("partition", "flood")


def _mark_events(axes: Any, events: Sequence[dict[str, Any]], *, labels: bool) -> None:
    top = axes.get_ylim()[1]
    for event in events:
        colour = EVENT_COLOURS.get(event["kind"])
        if colour is None:
            continue
        if event["kind"] in SPAN_KINDS and event.get("seconds"):
            axes.axvspan(event["t"], event["t"] + event["seconds"], color=colour, alpha=0.12, lw=0)
        axes.axvline(event["t"], color=colour, lw=1, ls="--", alpha=0.8)
        if labels and event["kind"] != "restart":  # a restart follows its kill within a second or two
            names = {"flood": "429 storm", "partition": f"partition {event.get('seconds', 0):g} s",
                     "kill": "SIGKILL + restart"}
            text = " ".join(filter(None, (names.get(event["kind"], event["kind"]), event.get("token"))))
            axes.text(event["t"], top * 0.98, f" {text}", rotation=90, va="top", ha="left",
                      fontsize=7, color=colour)


def _throughput(axes: Any, report: dict[str, Any]) -> None:
    timeline = report["timeline"]
    axes.plot(timeline["t"], timeline["accepted"], lw=0.8, color="#1f77b4", label="accepted/s")
    axes.plot(timeline["t"], timeline["delivered"], lw=0.8, color="#2ca02c", label="delivered/s")
    if any(timeline["duplicates"]):
        axes.plot(timeline["t"], timeline["duplicates"], lw=0.8, color="#d62728", label="duplicates/s")
    axes.set_ylabel("messages per second")
    axes.set_xlabel("seconds since the load started")
    backlog_axes = axes.twinx()
    backlog_axes.fill_between(timeline["t"], timeline["backlog"], color="#7f7f7f", alpha=0.2, lw=0)
    backlog_axes.set_ylabel("backlog (accepted, not yet delivered)", color="#555555")
    backlog_axes.set_ylim(bottom=0)
    axes.set_ylim(bottom=0)
    _mark_events(axes, report["events"], labels=True)
    handles, labels = axes.get_legend_handles_labels()
    axes.legend(handles, labels, loc="upper right", fontsize=8)
    axes.set_title("Throughput and backlog, faults marked")


def _tokens(axes: Any, report: dict[str, Any]) -> None:
    timeline = report["timeline"]
    names = list(timeline["per_token"])
    if names:
        axes.stackplot(timeline["t"], [timeline["per_token"][name] for name in names], labels=names,
                       alpha=0.85)
        axes.legend(loc="upper right", fontsize=7, ncol=min(5, len(names)))
    axes.set_ylabel("deliveries per second")
    axes.set_xlabel("seconds since the load started")
    axes.set_ylim(bottom=0)
    _mark_events(axes, report["events"], labels=False)
    axes.set_title("Per-token share (stacked)")


def _latency(axes: Any, latencies: Sequence[float]) -> None:
    axes.set_title("Latency: accepted → delivered")
    if not latencies:
        axes.text(0.5, 0.5, "no deliveries", ha="center", transform=axes.transAxes)
        return
    ordered = sorted(latencies)
    axes.hist(ordered, bins=80, color="#1f77b4", alpha=0.7)
    axes.set_yscale("log")
    axes.set_xlabel("seconds")
    axes.set_ylabel("messages (log)")
    cdf_axes = axes.twinx()
    count = len(ordered)
    cdf_axes.plot(ordered, [(index + 1) / count for index in range(count)], color="#000000", lw=1)
    cdf_axes.set_ylim(0, 1.01)
    cdf_axes.set_ylabel("fraction delivered (CDF)")
    figures = percentiles(ordered)
    for name, colour in (("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")):
        value = figures[name]
        assert value is not None
        cdf_axes.axvline(value, color=colour, ls="--", lw=1)
        cdf_axes.text(value, 0.05, f" {name} {value:.2f} s", rotation=90, fontsize=7, color=colour)


def render(run_dir: Path, report: dict[str, Any], latencies: Sequence[float]) -> list[str]:
    """Write the PNGs into ``run_dir``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    for name, draw, size in (("throughput.png", lambda ax: _throughput(ax, report), (11, 4.5)),
                             ("tokens.png", lambda ax: _tokens(ax, report), (11, 4)),
                             ("latency.png", lambda ax: _latency(ax, latencies), (8, 4))):
        figure, axes = pyplot.subplots(figsize=size)
        draw(axes)
        figure.tight_layout()
        figure.savefig(run_dir / name, dpi=110)
        pyplot.close(figure)
        written.append(name)
    figure, (top, middle, bottom) = pyplot.subplots(3, 1, figsize=(11, 12))
    _throughput(top, report)
    _tokens(middle, report)
    _latency(bottom, latencies)
    check = report["check"]
    figure.suptitle(f"{check['population']:,} accepted, {check['confirmed']:,} confirmed, "
                    f"{check['failed']['recipient']:,} failed (recipient), lost {check['lost']['count']}, "
                    f"duplicates {check['duplicates']['deliveries']} (in doubt {check['in_doubt_total']})",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(run_dir / "overview.png", dpi=90)
    pyplot.close(figure)
    written.append("overview.png")
    return written
