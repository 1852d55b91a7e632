"""From the raw records of a run to figures: latency, timelines, per-token throughput; and the
report files (``report.json``, ``report.md``) and the summary printed at the end.

Times are wall-clock seconds; timelines count per whole second since the load started.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .check import CheckResult, Delivered, StoredRow, Submission, first_deliveries, seq_of


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        memory = f", {kib / 1024 ** 2:.0f} GiB RAM"
    return (f"{os.cpu_count()} cores, {cpu}{memory}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p95/p99 (and mean, max, count) in seconds."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    ordered = sorted(values)

    def rank(fraction: float) -> float:
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    return {"count": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99),
            "mean": sum(ordered) / len(ordered), "max": ordered[-1]}


@dataclass
class Analysis:
    """What the plots and the report need, beyond the checker's verdict."""

    latency: dict[str, list[float]]
    timeline: dict[str, Any]
    tokens: list[dict[str, Any]]
    delivered_span: tuple[float, float] | None


def analyse(run_id: str, start_wall: float, tokens: Sequence[dict[str, Any]],
            submissions: Sequence[Submission], rows: Sequence[StoredRow],
            deliveries: Sequence[Delivered], quiet_until: float | None = None) -> Analysis:
    """``quiet_until``: when the first timed fault struck; messages accepted before it give the
    latency with only the steady faults (``accept_to_delivered_before_timed_faults``)."""
    ours = [d for d in deliveries if seq_of(run_id, d.text) is not None]
    first = first_deliveries(ours)
    rows_by_key: dict[tuple[int, str], StoredRow] = {}
    for row in rows:
        if seq_of(run_id, row.text) is not None:
            rows_by_key.setdefault((row.chat_id, row.text), row)
    submitted = {(s.chat_id, s.text): s for s in submissions}

    accept_times: dict[tuple[int, str], float] = {}
    for key, submission in submitted.items():
        if submission.accepted and submission.answered_at is not None:
            accept_times[key] = submission.answered_at
    for key, row in rows_by_key.items():
        accept_times[key] = row.created_at  # the commit itself, when the store knows it

    accept_to_delivered, submit_to_delivered, quiet = [], [], []
    for key, delivery in first.items():
        if key in accept_times:
            accept_to_delivered.append(max(0.0, delivery.timestamp - accept_times[key]))
            if quiet_until is not None and accept_times[key] < quiet_until:
                quiet.append(accept_to_delivered[-1])
        if key in submitted:
            submit_to_delivered.append(max(0.0, delivery.timestamp - submitted[key].submitted_at))
    accept_to_confirmed = [row.updated_at - row.created_at for row in rows_by_key.values()
                           if row.status == "confirmed"]

    names = {int(token["bot_id"]): str(token["name"]) for token in tokens}
    failed_times = [row.updated_at for row in rows_by_key.values() if row.status == "failed"]
    duplicate_times = [d.timestamp for d in ours if first.get((d.chat_id, d.text)) is not d]
    last = max([*accept_times.values(), *(d.timestamp for d in ours), *failed_times, start_wall])
    seconds = int(last - start_wall) + 1

    def per_second(times: Sequence[float]) -> list[int]:
        counts = [0] * seconds
        for at in times:
            counts[min(seconds - 1, max(0, int(at - start_wall)))] += 1
        return counts

    accepted = per_second(list(accept_times.values()))
    delivered = per_second([d.timestamp for d in first.values() if (d.chat_id, d.text) in accept_times])
    failed = per_second(failed_times)
    backlog, outstanding = [], 0
    for index in range(seconds):
        outstanding += accepted[index] - delivered[index] - failed[index]
        backlog.append(outstanding)
    by_token: dict[str, list[float]] = defaultdict(list)
    for delivery in ours:
        by_token[names.get(delivery.bot_id, str(delivery.bot_id))].append(delivery.timestamp)
    timeline = {"t": list(range(seconds)), "accepted": accepted, "delivered": delivered,
                "failed": failed, "duplicates": per_second(duplicate_times), "backlog": backlog,
                "per_token": {name: per_second(times) for name, times in sorted(by_token.items())}}

    span = (min(d.timestamp for d in ours), max(d.timestamp for d in ours)) if ours else None
    stored_by_token = Counter(row.token for row in rows_by_key.values() if row.status == "confirmed")
    total = len(ours) or 1
    token_rows = []
    for token in tokens:
        name = str(token["name"])
        times = by_token.get(name, [])
        active = (max(times) - min(times)) if len(times) > 1 else 0.0
        token_rows.append({"name": name, "bot_id": token["bot_id"], "delivered": len(times),
                           "share": len(times) / total, "confirmed_in_store": stored_by_token.get(name, 0),
                           "msg_per_s": len(times) / active if active else None})
    return Analysis({"accept_to_delivered": accept_to_delivered,
                     "submit_to_delivered": submit_to_delivered,
                     "accept_to_confirmed": accept_to_confirmed,
                     "accept_to_delivered_before_timed_faults": quiet},
                    timeline, token_rows, span)


def build_report(record: dict[str, Any], result: CheckResult, analysis: Analysis) -> dict[str, Any]:
    check = result.as_json()
    span = analysis.delivered_span
    delivered_total = sum(token["delivered"] for token in analysis.tokens)
    return {
        "run_id": record["run_id"],
        "machine": record["machine"],
        "settings": record["settings"],
        "started_at": record["start_wall"],
        "elapsed": record["elapsed"],
        "verdict": {"passed": check["passed"], "problems": check["problems"]},
        "check": check,
        "latency_seconds": {name: percentiles(values) for name, values in analysis.latency.items()},
        "throughput": {
            "deliveries": delivered_total,
            "delivery_span_seconds": None if span is None else span[1] - span[0],
            "delivered_per_second": (delivered_total / (span[1] - span[0])
                                     if span and span[1] > span[0] else None),
            "peak_backlog": max(analysis.timeline["backlog"], default=0),
        },
        "tokens": analysis.tokens,
        "client": record["client"],
        "events": record["events"],
        "relay_samples": record.get("relay_samples", []),
        "timeline": analysis.timeline,
        "plots": record.get("plots", []),
    }


def _pct(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def _secs(value: float | None) -> str:
    return "-" if value is None else (f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s")


def summary_lines(report: dict[str, Any]) -> list[str]:
    check, client = report["check"], report["client"]
    failed = check["failed"]
    latency = report["latency_seconds"]["accept_to_delivered"]
    lines = [
        f"run {report['run_id']}: {'PASSED' if report['verdict']['passed'] else 'FAILED'}"
        + ("" if report["verdict"]["passed"] else f" ({'; '.join(report['verdict']['problems'])})"),
        f"  offered {client['messages_offered']:,} messages at {report['settings']['rate']:g}/s; "
        f"accepted {check['population']:,} ({check['accepted_unacknowledged']:,} without the client "
        f"hearing so), rejected {sum(check['rejected'].values()):,}, unanswered {check['unanswered']:,}",
        f"  confirmed {check['confirmed']:,}; failed {failed['total']:,} "
        f"({failed['recipient']:,} the recipient's fault, {failed['other']:,} other)",
        f"  LOST {check['lost']['count']:,}; duplicate deliveries {check['duplicates']['deliveries']:,} "
        f"(in-doubt sends {check['in_doubt_total']:,}, unexplained "
        f"{check['duplicates']['unexplained']['count']:,})",
        f"  delivery rate {_pct(check['delivery_rate'])} of accepted, "
        f"{_pct(check['deliverable_rate'])} of deliverable (target {check['target']:.1%})",
        f"  accept->delivered p50 {_secs(latency['p50'])}, p95 {_secs(latency['p95'])}, "
        f"p99 {_secs(latency['p99'])}, max {_secs(latency['max'])}",
        f"  throughput {report['throughput']['delivered_per_second'] or 0:,.0f} deliveries/s; "
        f"peak backlog {report['throughput']['peak_backlog']:,}; late starts {client['late_starts']:,} "
        f"of {client['scheduled_requests']:,} requests",
        f"  elapsed: load {report['elapsed']['load_seconds']:.1f} s, drain "
        f"{report['elapsed']['drain_seconds']:.1f} s, total {report['elapsed']['total_seconds']:.1f} s",
    ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    check, client, settings = report["check"], report["client"], report["settings"]
    failed = check["failed"]
    verdict = report["verdict"]
    out = [f"# Load run {report['run_id']}", "",
           f"**{'PASSED' if verdict['passed'] else 'FAILED'}**"
           + ("" if verdict["passed"] else ": " + "; ".join(verdict["problems"])), "",
           f"Machine: {report['machine']}.  ",
           f"Load: {client['messages_offered']:,} messages at {settings['rate']:g}/s "
           f"({settings['batch']} per request, at most {settings['concurrency']} requests in flight) "
           f"to {settings['chats']:,} chats over {settings['tokens']} tokens.", "",
           "| figure | value |", "|---|---|",
           f"| accepted | {check['population']:,} ({check['accepted_unacknowledged']:,} committed without "
           f"the client hearing so) |",
           f"| rejected / unanswered | {sum(check['rejected'].values()):,} / {check['unanswered']:,} |",
           f"| confirmed | {check['confirmed']:,} |",
           f"| failed, recipient's fault | {failed['recipient']:,} |",
           f"| failed, other | {failed['other']:,} |",
           f"| **lost** | **{check['lost']['count']:,}** |",
           f"| duplicate deliveries (unexplained) | {check['duplicates']['deliveries']:,} "
           f"({check['duplicates']['unexplained']['count']:,}) |",
           f"| in-doubt sends | {check['in_doubt_total']:,} |",
           f"| delivery rate (confirmed / accepted) | {_pct(check['delivery_rate'])} |",
           f"| delivery rate of deliverable messages | {_pct(check['deliverable_rate'])} "
           f"(target {check['target']:.1%}) |",
           f"| throughput | {report['throughput']['delivered_per_second'] or 0:,.0f} deliveries/s |",
           f"| peak backlog | {report['throughput']['peak_backlog']:,} |",
           f"| chats delivered out of order | {check['ordering']['chats_out_of_order']:,} |",
           f"| elapsed (load + drain) | {report['elapsed']['load_seconds']:.1f} s + "
           f"{report['elapsed']['drain_seconds']:.1f} s |", ""]
    out += ["## Latency", "", "| | p50 | p95 | p99 | max |", "|---|---|---|---|---|"]
    labels = {"accept_to_delivered": "accepted (commit) → delivered (simulator)",
              "submit_to_delivered": "submitted (client) → delivered",
              "accept_to_confirmed": "accepted → confirmed (store)",
              "accept_to_delivered_before_timed_faults": "accepted → delivered, before the first "
                                                         "timed fault"}
    for name, label in labels.items():
        figures = report["latency_seconds"][name]
        if not figures["count"]:
            continue
        out.append(f"| {label} | {_secs(figures['p50'])} | {_secs(figures['p95'])} | "
                   f"{_secs(figures['p99'])} | {_secs(figures['max'])} |")
    out += ["", "## Tokens", "", "| token | delivered | share | msg/s, first to last delivery |", "|---|---|---|---|"]
    for token in report["tokens"]:
        rate = "-" if token["msg_per_s"] is None else f"{token['msg_per_s']:.1f}"
        out.append(f"| {token['name']} | {token['delivered']:,} | {token['share']:.1%} | {rate} |")
    out += ["", "## Faults", "", "| t (s) | event |", "|---|---|"]
    out += [f"| {event['t']:.1f} | {event['kind']}: {event['detail']} |" for event in report["events"]]
    if failed["by_reason"]:
        out += ["", "## Failures by reason", "", "| reason | messages |", "|---|---|"]
        out += [f"| {reason} | {count:,} |" for reason, count in failed["by_reason"].items()]
    for name in ("lost", "unfinished", "failed_but_delivered", "wrong_message_id", "vanished_rows",
                 "unexpected_deliveries", "accepted_twice"):
        if check[name]["count"]:
            out += ["", f"## {name.replace('_', ' ').capitalize()} ({check[name]['count']:,})", ""]
            out += [f"- chat {item['chat_id']}, `{item['text']}` (id {item['message_id']}): {item['why']}"
                    for item in check[name]["sample"]]
    if check["duplicates"]["unexplained"]["count"]:
        out += ["", "## Unexplained duplicates", ""]
        out += [f"- chat {item['chat_id']}, `{item['text']}`: {item['copies']} copies, "
                f"{item['in_doubt_count']} in-doubt sends" for item in check["duplicates"]["unexplained"]["sample"]]
    out += ["", "## Client", "",
            f"- requests scheduled {client['scheduled_requests']:,}, late starts (> "
            f"{client['late_after_seconds']:g} s behind schedule) {client['late_starts']:,}, "
            f"lateness p99 {_secs(client['lateness']['p99'])}, max {_secs(client['lateness']['max'])}",
            f"- HTTP attempts {client['attempts']:,}; retried: "
            + (", ".join(f"{reason} x{count}" for reason, count in client["retries"].items()) or "none"),
            f"- answer time p50 {_secs(client['answer']['p50'])}, p99 {_secs(client['answer']['p99'])}"]
    if report["plots"]:
        out += ["", "## Pictures", ""] + [f"![{Path(plot).stem}]({plot})" for plot in report["plots"]]
    return "\n".join(out) + "\n"


def write(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (run_dir / "report.md").write_text(markdown(report), encoding="utf-8")
