"""Summaries (medians over runs), the issue's targets, results.md and the PNG plots."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .floor import floor_us
from .stats import median_of, median_records
from .targets import LABELS

logger = logging.getLogger(__name__)

PEERS = ("flask", "node")


# -- medians over runs ------------------------------------------------------------------------


def summarize(scenario: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The median over ``runs`` of one scenario and target (errors left out)."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": runs[-1].get("error") if runs else "no run"}
    if scenario in ("fanout", "cluster"):
        return _summarize_ladder(good)
    if scenario == "notify":
        summary: dict[str, Any] = {"users": good[0]["users"], "nodes": good[0]["nodes"],
                                   "idle_cpu_percent": median_of(
                                       run.get("idle_cpu_percent") for run in good),
                                   "subscribe_refusals": max(
                                       run["connect"].get("subscribe_refusals", 0)
                                       for run in good)}
        for method in ("api", "emitter", "batch"):
            if method in good[0]:
                summary[method] = {
                    kind: median_records([run[method][kind] for run in good if method in run])
                    for kind in ("fixed_rate", "max")}
        return summary
    if scenario == "capacity":
        return {part: median_records([run[part] for run in good if part in run])
                for part in ("one_node", "cluster") if any(part in run for run in good)}
    if scenario == "browser":
        variants: list[str] = []
        for run in good:
            variants += [name for name in run if name not in variants]
        return {name: median_records([run[name] for run in good if name in run])
                for name in variants}
    if scenario == "soak":
        return _summarize_soak(good)
    summary = median_records(good)
    if scenario == "idle":
        summary["memory_curve"] = good[len(good) // 2]["memory_curve"]
    return summary


# Soak counts where one bad run must show, whatever the median says.
SOAK_WORST = ("shared_lost", "user_lost", "notify_errors", "notify_unacked", "before_window",
              "epoch_changes", "resets", "rss_slope_mb_per_min", "rss_slope_max_node_mb_per_min")


def _summarize_soak(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians of the soak runs, the worst of every failure count, and one run's curves."""
    summary = median_records(runs)
    for key in SOAK_WORST:
        values = [run[key] for run in runs if isinstance(run.get(key), int | float)]
        if values:
            summary[key] = max(values)
    summary["checks"] = {key: all(run["checks"][key] for run in runs)
                         for key in runs[0]["checks"]}
    summary["pass"] = all(run["pass"] for run in runs)
    middle = runs[len(runs) // 2]
    summary["per_node"] = middle["per_node"]
    summary["samples"] = middle["samples"]
    summary["error_samples"] = middle.get("error_samples", {})
    summary["lost_samples"] = [s for run in runs for s in run.get("lost_samples", [])][:20]
    return summary


def _summarize_ladder(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    rates: list[float] = []
    for run in runs:
        rates += [step["rate"] for step in run["steps"] if step["rate"] not in rates]
    steps = []
    for rate in sorted(rates):
        records = [step for run in runs for step in run["steps"] if step["rate"] == rate]
        step = median_records(records)
        step["runs"] = len(records)
        # Never hide a loss, duplicate or reordering behind a median.
        for key in ("lost", "duplicated", "reordered", "publish_errors", "crashed_nodes"):
            step[key + "_max"] = max(record.get(key) or 0 for record in records)
        step["saturated"] = any(record.get("saturated") for record in records)
        steps.append(step)
    summary: dict[str, Any] = {
        "subscribers": runs[0]["subscribers"],
        "nodes": runs[0]["nodes"],
        "steps": steps,
        "saturation_dps": median_of(run["saturation_dps"] for run in runs),
        "subscribers_disconnected": max(run.get("subscribers_disconnected", 0) for run in runs),
    }
    overloads = [run["overload"] for run in runs if "overload" in run]
    if overloads:
        flat = [{k: v for k, v in o.items() if not isinstance(v, dict)} for o in overloads]
        overload = median_records(flat)
        overload["lost"] = max(o["step"]["lost"] for o in overloads)
        overload["reordered"] = max(o["step"]["reordered"] for o in overloads)
        overload["duplicated"] = max(o["step"]["duplicated"] for o in overloads)
        overload["p99_ms"] = median_of(o["step"]["p99_ms"] for o in overloads)
        overload["checks"] = {key: all(o["checks"][key] for o in overloads)
                              for key in overloads[0]["checks"]}
        overload["pass"] = all(o["pass"] for o in overloads)
        summary["overload"] = overload
    return summary


def step_at(summary: Mapping[str, Any] | None, rate: float) -> dict[str, Any] | None:
    """The ladder step at ``rate`` publishes/s of a fanout summary."""
    if not summary or "steps" not in summary:
        return None
    return next((step for step in summary["steps"] if step["rate"] == rate), None)


# -- the targets ----------------------------------------------------------------------


def _target(number: int | str, name: str, goal: str, measured: str, passed: bool | None,
            margin: str) -> dict[str, Any]:
    return {"number": number, "target": name, "goal": goal, "measured": measured,
            "pass": passed, "margin": margin}


def _over(value: float, limit: float) -> str:
    """How far ``value`` is from an upper ``limit``."""
    if value <= limit:
        return f"{(1 - value / limit) * 100:.0f}% under the limit"
    return f"{value / limit:.2f}x the limit ({(value / limit - 1) * 100:.0f}% over)"


def _under(value: float, minimum: float) -> str:
    """How far ``value`` is from a lower bound ``minimum``."""
    if value >= minimum:
        return f"{(value / minimum - 1) * 100:.0f}% above the goal"
    return (f"{value / minimum * 100:.1f}% of the goal "
            f"({(1 - value / minimum) * 100:.1f}% short)")


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for realtime, each with pass/fail and the margin (None: unmeasured)."""
    scenarios = results.get("scenarios", {})
    floor = floor_us(results.get("floor"))

    def summary(scenario: str, target: str = "realtime") -> dict[str, Any] | None:
        found = scenarios.get(scenario, {}).get(target, {}).get("summary")
        return None if not found or "error" in found else found

    fanout = summary("fanout")
    standard = fanout is not None and fanout["subscribers"] == 2000
    note = "" if standard else " (not at N=2000: not comparable)"
    targets = []

    step = step_at(fanout, 60)
    if step and step.get("cpu_us_per_delivery") and floor:
        ratio = step["cpu_us_per_delivery"] / floor
        targets.append(_target(
            1, "server CPU per delivery, N=2000, 60 publishes/s", "≤ 1.2x floor",
            f"{step['cpu_us_per_delivery']:.2f} µs = {ratio:.2f}x floor ({floor:.2f} µs)"
            + (" (saturated)" if step["saturated"] else "") + note,
            ratio <= 1.2 and standard, _over(ratio, 1.2)))
    else:
        targets.append(_target(1, "server CPU per delivery, N=2000, 60 publishes/s",
                               "≤ 1.2x floor", "not measured (needs floor and fanout at 60/s)",
                               None, ""))

    step = step_at(fanout, 30)
    if step and step.get("p99_ms") is not None:
        targets.append(_target(2, "latency p99, N=2000, 30 publishes/s", "≤ 15 ms",
                               f"{step['p99_ms']:.1f} ms" + note,
                               step["p99_ms"] <= 15 and standard, _over(step["p99_ms"], 15)))
    else:
        targets.append(_target(2, "latency p99, N=2000, 30 publishes/s", "≤ 15 ms",
                               "not measured (needs fanout at 30/s)", None, ""))

    node = summary("fanout", "node")
    if fanout and node and node.get("saturation_dps"):
        ratio = fanout["saturation_dps"] / node["saturation_dps"]
        targets.append(_target(
            3, "saturation deliveries/s vs Node peer, N=2000", "≥ 2x Node",
            f"{fanout['saturation_dps']:.0f} vs {node['saturation_dps']:.0f} = {ratio:.2f}x"
            + note, ratio >= 2 and standard, _under(ratio, 2)))
    else:
        targets.append(_target(3, "saturation deliveries/s vs Node peer, N=2000", "≥ 2x Node",
                               "not measured (needs fanout of realtime and node)", None, ""))

    overload = (fanout or {}).get("overload")
    if overload:
        failed = [key for key, ok in overload["checks"].items() if not ok]
        targets.append(_target(
            4, "2x saturating rate: no crash/loss/reorder, bounded memory, slow clients cut",
            "all checks pass",
            f"lost {overload['lost']}, reordered {overload['reordered']}, RSS +"
            f"{overload['rss_growth_mb']} MB, slow clients cut "
            f"{overload['stalled_disconnected']}/{overload['stalled_clients']}",
            overload["pass"], "failed: " + ", ".join(failed) if failed else "all checks pass"))
    else:
        targets.append(_target(4, "2x saturating rate: no crash/loss/reorder, bounded memory",
                               "all checks pass", "not measured (fanout did not saturate, or "
                               "--no-overload/--quick)", None, ""))

    idle = summary("idle")
    if idle and idle.get("kb_per_connection") is not None:
        at = idle["connected"]
        targets.append(_target(
            5, "idle memory per WebSocket connection at 8000", "≤ 12 KB",
            f"{idle['kb_per_connection']:.1f} KB at {at:,} connections",
            idle["kb_per_connection"] <= 12 and at >= 8000, _over(idle["kb_per_connection"], 12)
            + ("" if at >= 8000 else f" (only {at} connections)")))
    else:
        targets.append(_target(5, "idle memory per WebSocket connection at 8000", "≤ 12 KB",
                               "not measured (needs idle)", None, ""))

    capacity = summary("capacity")
    parts = []
    checks: list[bool] = []
    margins = []
    if capacity:
        one = capacity.get("one_node", {})
        many = capacity.get("cluster", {})
        parts.append(f"one node {one.get('connected')}/{one.get('connections')}")
        parts.append(f"{many.get('nodes')} nodes {many.get('connected')}/"
                     f"{many.get('connections')}")
        checks += [(one.get("connected") or 0) >= 20000, (many.get("connected") or 0) >= 60000]
        for what, got, goal in (("one node", one.get("connected") or 0, 20000),
                                (f"{many.get('nodes')} nodes", many.get("connected") or 0, 60000)):
            margins.append(f"{what}: {goal - got:,} connections short" if got < goal
                           else f"{what}: met")
    else:
        margins.append("capacity not run (bench/run.py capacity)")
    if idle:
        rate = idle["handshakes_per_s_per_node"]
        parts.append(f"{rate:.0f} handshakes/s per node")
        checks.append(rate >= 2000)
        margins.append(f"handshakes {_under(rate, 2000)}")
    passed = (all(checks) if capacity and idle else (False if not all(checks) else None))
    targets.append(_target(
        6, "20,000 connections per node, 60,000 over 4 nodes, ≥ 2,000 handshakes/s per node",
        "all three", ", ".join(parts) if parts else "not measured (needs capacity and idle)",
        passed, "; ".join(margins)))

    notify = summary("notify")
    if notify:
        bits = []
        for method in ("api", "emitter", "batch"):
            if method in notify:
                flat, fixed = notify[method]["max"], notify[method]["fixed_rate"]
                bits.append(f"{method}: {_fmt(flat.get('publishes_per_s_per_node'), 0)} "
                            f"publishes/s per node, p99 {_fmt(fixed.get('p99_ms'), 1)} ms at "
                            f"{fixed.get('rate'):g}/s, lost {flat.get('lost')}")
        targets.append(_target(7, "personal notifications (10,000 user channels)",
                               "reported against the peers", "; ".join(bits), None,
                               "see the notify table"))
    else:
        targets.append(_target(7, "personal notifications (10,000 user channels)",
                               "reported against the peers", "not measured", None, ""))
    targets += browser_targets(summary("browser"))
    return targets


def browser_targets(browser: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The session issue's targets, from the browser scenario (numbered B1-B4)."""
    ws, default = (browser or {}).get("websocket-json"), (browser or {}).get("default-json")
    ws_msgpack = (browser or {}).get("websocket-msgpack")
    rows = [
        ("B1", "default start after upgrade: server CPU per delivery", "cpu_us_per_delivery",
         default, ws, 1.15, "µs"),
        ("B2", "default start after upgrade: memory per connection", "kb_per_connection",
         default, ws, 1.25, "KB"),
        ("B3", "connects (+ upgrades), browser_concurrency at a time", "connect_s",
         default, ws, 2.0, "s"),
        ("B4", "msgpack clients: server CPU per delivery", "cpu_us_per_delivery",
         ws_msgpack, ws, 1.1, "µs"),
    ]
    targets = []
    for number, name, key, measured, baseline, limit, unit in rows:
        base = "JSON clients" if number == "B4" else "WebSocket-first"
        goal = f"≤ {limit:g}x {base}"
        got, ref = (measured or {}).get(key), (baseline or {}).get(key)
        if not isinstance(got, int | float) or not isinstance(ref, int | float) or not ref:
            targets.append(_target(number, name, goal, "not measured (needs the browser "
                                   "scenario)", None, ""))
            continue
        ratio = got / ref
        lost = (measured or {}).get("lost", 0) + (measured or {}).get("reordered", 0) + (
            measured or {}).get("duplicated", 0)
        targets.append(_target(
            number, name, goal, f"{got:.2f} vs {ref:.2f} {unit} = {ratio:.2f}x"
            + (f" ({lost} lost/reordered/duplicated)" if lost else ""),
            ratio <= limit and not lost, _over(ratio, limit)))
    return targets


# -- markdown ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def headline(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The side-by-side metrics: one row per metric, one value per target."""
    scenarios = results.get("scenarios", {})
    floor = floor_us(results.get("floor"))

    def get(scenario: str, target: str) -> dict[str, Any] | None:
        found = scenarios.get(scenario, {}).get(target, {}).get("summary")
        return None if not found or "error" in found else found

    rows: list[dict[str, Any]] = []

    def row(metric: str, better: str, values: dict[str, Any]) -> None:
        if any(v is not None for v in values.values()):
            rows.append({"metric": metric, "better": better, "values": values})

    targets = results.get("settings", {}).get("targets", [])
    n = results.get("settings", {}).get("subscribers")
    for rate in (30, 60):
        row(f"fanout N={n}, {rate}/s: server CPU µs per delivery", "lower",
            {t: (step_at(get("fanout", t), rate) or {}).get("cpu_us_per_delivery")
             for t in targets})
    if floor:
        row(f"fanout N={n}, 60/s: CPU per delivery ÷ floor ({floor:.2f} µs)", "lower",
            {t: (step_at(get("fanout", t), 60) or {}).get("vs_floor") for t in targets})
    for rate in (30, 60):
        row(f"fanout N={n}, {rate}/s: latency p99 ms", "lower",
            {t: (step_at(get("fanout", t), rate) or {}).get("p99_ms") for t in targets})
    row(f"fanout N={n}: saturation deliveries/s", "higher",
        {t: (get("fanout", t) or {}).get("saturation_dps") for t in targets})
    row(f"cluster via nginx N={n}: saturation deliveries/s", "higher",
        {t: (get("cluster", t) or {}).get("saturation_dps") for t in targets})
    row("idle: KB per connection", "lower",
        {t: (get("idle", t) or {}).get("kb_per_connection") for t in targets})
    row("idle: handshakes/s per node", "higher",
        {t: (get("idle", t) or {}).get("handshakes_per_s_per_node") for t in targets})
    row("notify: HTTP API publishes/s per node", "higher",
        {t: ((get("notify", t) or {}).get("api") or {}).get("max", {}).get(
            "publishes_per_s_per_node") for t in targets})
    row("notify: HTTP API latency p99 ms at fixed rate", "lower",
        {t: ((get("notify", t) or {}).get("api") or {}).get("fixed_rate", {}).get("p99_ms")
         for t in targets})
    row("churn: connect/subscribe/disconnect cycles/s", "higher",
        {t: (get("churn", t) or {}).get("cycles_per_s") for t in targets})
    row("churn: server CPU ms per cycle", "lower",
        {t: (get("churn", t) or {}).get("cpu_ms_per_cycle") for t in targets})
    return rows


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: headline, targets, then every scenario's table."""
    settings = results.get("settings", {})
    meta = results.get("meta", {})
    targets = settings.get("targets", [])
    peers = [t for t in targets if t in PEERS]
    lines = [f"# realtime benchmark — {meta.get('date', '')}", ""]
    lines += [f"Command: `{meta.get('command', '')}`"
              + (f" at commit `{meta['commit']}`" if meta.get("commit") else ""), "",
              f"Machine: {meta.get('machine', '')}. All processes (servers, Redis, nginx, load "
              "generator) share it; ratios compare targets measured within this run, "
              f"interleaved ({settings.get('runs', 1)} run(s) each, medians).", ""]
    for target, reason in results.get("skipped", {}).items():
        lines += [f"**{LABELS.get(target, target)} skipped:** {reason}", ""]

    rows = headline(results)
    if rows:
        lines += ["## Headline", ""]
        header = ["metric", *[LABELS.get(t, t) for t in targets]]
        header += [f"realtime / {LABELS[p]}" for p in peers if "realtime" in targets]
        table = []
        for entry in rows:
            values = entry["values"]
            cells = [f"{entry['metric']} ({entry['better']} is better)"]
            cells += [_fmt(values.get(t), 2) for t in targets]
            if "realtime" in targets:
                cells += [_ratio(values.get("realtime"), values.get(p)) for p in peers]
            table.append(cells)
        lines += _table(header, table)

    if results.get("targets"):
        lines += ["## Targets (realtime)", ""]
        lines += _table(["#", "target", "goal", "measured", "pass", "margin"], [
            [t["number"], t["target"], t["goal"], t["measured"],
             {True: "✅ pass", False: "❌ fail", None: "-"}[t["pass"]], t["margin"]]
            for t in results["targets"]])

    floor = results.get("floor")
    if floor:
        lines += ["## Floor", "",
                  f"A bare Python loop sending a pre-encoded {floor['frame_bytes']}-byte "
                  f"WebSocket frame to each of {floor['sockets']} loopback sockets, "
                  f"{floor['rate']:g} rounds/s for {floor['duration_s']:g} s, "
                  f"{floor.get('repeat', 1)} time(s) per row (median); CPU of the sending "
                  "process (user + system).", ""]
        lines += _table(["frames per send()", "sends", "CPU µs per send", "CPU µs per frame",
                         "kept the schedule"],
                        [[r["frames_per_send"], _fmt(r["sends"]), _fmt(r["us_per_send"], 2),
                          _fmt(r["us_per_frame"], 2), _fmt(r["on_schedule"])]
                         for r in floor["results"]])

    scenarios = results.get("scenarios", {})
    for name in ("fanout", "cluster"):
        if name not in scenarios:
            continue
        title = "Fanout" if name == "fanout" else "Cluster (through nginx)"
        lines += [f"## {title}", ""]
        for target, data in scenarios[name].items():
            summary = data.get("summary", {})
            if "error" in summary:
                lines += [f"**{LABELS.get(target, target)}: failed:** {summary['error']}", ""]
                continue
            lines += [f"**{LABELS.get(target, target)}** — {summary['subscribers']} subscribers "
                      f"on {summary['nodes']} node(s); saturation "
                      f"{_fmt(summary['saturation_dps'])} deliveries/s", ""]
            header = ["publishes/s", "offered deliveries/s", "achieved", "p50 ms", "p99 ms",
                      "p99.9 ms", "max ms", "server CPU µs/delivery", "x floor", "redis CPU s"]
            header += ["nginx CPU s"] if name == "cluster" else []
            header += ["lost", "dup", "reordered", "saturated"]
            rows = []
            for s in summary["steps"]:
                row = [_fmt(s["rate"], 0), _fmt(s["offered_dps"]), _fmt(s["achieved_dps"]),
                       _fmt(s["p50_ms"], 2), _fmt(s["p99_ms"], 2), _fmt(s["p999_ms"], 2),
                       _fmt(s["max_ms"], 2), _fmt(s["cpu_us_per_delivery"], 2),
                       _fmt(s["vs_floor"], 2), _fmt(s["redis_cpu_s"], 2)]
                row += [_fmt(s["nginx_cpu_s"], 2)] if name == "cluster" else []
                row += [_fmt(s["lost_max"]), _fmt(s["duplicated_max"]),
                        _fmt(s["reordered_max"]), _fmt(s["saturated"])]
                rows.append(row)
            lines += _table(header, rows)
            overload = summary.get("overload")
            if overload:
                checks = ", ".join(f"{k} {'✅' if v else '❌'}"
                                   for k, v in overload["checks"].items())
                lines += [f"Overload at {_fmt(overload['rate'])} publishes/s (2x saturation) "
                          f"with {overload['stalled_clients']} clients that stop reading: "
                          f"lost {overload['lost']}, reordered {overload['reordered']}, "
                          f"duplicated {overload['duplicated']}, p99 "
                          f"{_fmt(overload['p99_ms'])} ms, node RSS {overload['rss_before_mb']}"
                          f" → peak {overload['rss_peak_mb']} MB, slow clients disconnected "
                          f"{overload['stalled_disconnected']}/{overload['stalled_clients']}. "
                          f"{checks}", ""]

    if "idle" in scenarios or "capacity" in scenarios:
        lines += ["## Idle connections", ""]
        table = []
        for scenario in ("idle", "capacity"):
            for target, data in scenarios.get(scenario, {}).items():
                summary = data.get("summary", {})
                parts = [summary] if scenario == "idle" else list(summary.values())
                for part in parts:
                    if not isinstance(part, dict) or "connections" not in part:
                        continue
                    table.append([f"{scenario} {LABELS.get(target, target)}", part["nodes"],
                                  f"{_fmt(part['connected'])}/{_fmt(part['connections'])}",
                                  _fmt(part["handshakes_per_s"]),
                                  _fmt(part["handshakes_per_s_per_node"]),
                                  _fmt(part["kb_per_connection"], 2),
                                  _fmt(part["idle_cpu_percent"], 2),
                                  _fmt(part["dropped_while_idle"]),
                                  _fmt(part["rss_after_mb"])])
        lines += _table(["scenario, target", "nodes", "connected", "handshakes/s",
                         "handshakes/s per node", "KB per connection", "idle CPU %",
                         "dropped while idle", "node RSS MB"], table)

    if "notify" in scenarios:
        lines += ["## Personal notifications", ""]
        table = []
        for target, data in scenarios["notify"].items():
            summary = data.get("summary", {})
            if "error" in summary:
                lines += [f"**{LABELS.get(target, target)}: failed:** {summary['error']}", ""]
                continue
            for method in ("api", "emitter", "batch"):
                if method not in summary:
                    continue
                fixed, flat = summary[method]["fixed_rate"], summary[method]["max"]
                table.append([f"{LABELS.get(target, target)} {method}", summary["users"],
                              _fmt(summary.get("idle_cpu_percent"), 1),
                              _fmt(fixed["rate"], 0), _fmt(fixed["p50_ms"], 2),
                              _fmt(fixed["p99_ms"], 2), _fmt(fixed.get("request_p50_ms"), 2),
                              _fmt(fixed["lost"]),
                              _fmt(flat["publishes_per_s"]),
                              _fmt(flat["publishes_per_s_per_node"]),
                              _fmt(flat["p99_ms"], 1), _fmt(flat["lost"]),
                              _fmt(flat["publish_errors"])])
        lines += _table(["target, publisher", "users", "nodes' idle CPU %", "fixed rate /s",
                         "p50 ms", "p99 ms", "publish call p50 ms", "lost", "max publishes/s",
                         "per node", "p99 ms at max", "lost at max", "errors at max"], table)

    if "churn" in scenarios:
        lines += ["## Churn", ""]
        table = []
        for target, data in scenarios["churn"].items():
            s = data.get("summary", {})
            if "error" in s:
                lines += [f"**{LABELS.get(target, target)}: failed:** {s['error']}", ""]
                continue
            table.append([LABELS.get(target, target), _fmt(s["concurrency"]),
                          _fmt(s["cycles_per_s"]), _fmt(s["errors"]), _fmt(s["cycle_p50_ms"]),
                          _fmt(s["cycle_p99_ms"]), _fmt(s["cpu_ms_per_cycle"], 3),
                          f"{s['rss_before_mb']} → {s['rss_after_mb']}"])
        lines += _table(["target", "concurrent loops", "cycles/s", "errors", "cycle p50 ms",
                         "cycle p99 ms", "server CPU ms/cycle", "node RSS MB"], table)

    lines += _soak_markdown(scenarios.get("soak", {}))

    browser = (scenarios.get("browser", {}).get("realtime") or {}).get("summary")
    if browser and "error" not in browser:
        lines += ["## Browser clients (realtime)", "",
                  "The official socket.io-client in Node, one fresh node per variant: "
                  "`default` is the client's default start (long-polling, then the upgrade), "
                  "`websocket` is `transports: ['websocket']`; `msgpack` uses "
                  "socket.io-msgpack-parser. Latency is measured against the Node client's "
                  "own clock and event loop: informative only.", ""]
        table = []
        for name, v in browser.items():
            table.append([name, f"{_fmt(v.get('connected'))}/{_fmt(v.get('clients'))}",
                          _fmt(v.get("connect_s"), 2), _fmt(v.get("connects_per_s")),
                          _fmt(v.get("kb_per_connection"), 2),
                          _fmt(v.get("cpu_us_per_delivery"), 2), _fmt(v.get("p50_ms"), 1),
                          _fmt(v.get("p99_ms"), 1), _fmt(v.get("lost")),
                          _fmt(v.get("duplicated")), _fmt(v.get("reordered"))])
        lines += _table(["variant", "connected", "connect s", "connects/s",
                         "KB per connection", "server CPU µs/delivery", "p50 ms", "p99 ms",
                         "lost", "dup", "reordered"], table)

    errors = [(scenario, target, run["error"]) for scenario, by_target in scenarios.items()
              for target, data in by_target.items() for run in data.get("runs", [])
              if "error" in run]
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {scenario} {target}: {error}" for scenario, target, error in errors] + [""]
    lines += ["Latency: from the publisher's send to the kernel's receive timestamp on the "
              "subscriber's socket (SO_TIMESTAMPNS, one clock), so the load generator's own "
              "delays are left out. Server CPU: utime + stime of the node processes (/proc) over "
              "each step, divided by the deliveries the clients counted.", ""]
    return "\n".join(lines)


def _soak_markdown(by_target: Mapping[str, Any]) -> list[str]:
    """The soak section: what ran, what was lost, memory and descriptors, the checks."""
    lines: list[str] = []
    for target, data in by_target.items():
        s = data.get("summary", {})
        name = LABELS.get(target, target)
        if "error" in s:
            lines += [f"## Soak ({name})", "", f"**Failed:** {s['error']}", ""]
            continue
        lines += [f"## Soak ({name})", "",
                  f"{_fmt(s['duration_s'], 0)} s of churn on {s['nodes']} node(s) with Redis: "
                  f"{s['clients']} loops, each a client at a time that connects, subscribes to "
                  f"a shared channel and to its own `user:<id>`, stays 0-{s['hold_max_s']:g} s, "
                  f"checks it got every publication of its stay, and disconnects (every "
                  f"{s['abort_every']}th with a TCP reset); {s['publish_rate']:g} publishes/s on "
                  f"the shared channel, {s['notify_rate']:g} notifications/s to the user "
                  "channels through the HTTP API. RSS slope: least squares over the samples "
                  f"after a {_fmt(s['warmup_s'], 0)} s warm-up ({s['fit_samples']} samples).", ""]
        rows = [
            ("cycles (connect, two subscribes, receive, disconnect)",
             f"{_fmt(s['cycles'])} ({_fmt(s['cycles_per_s'])}/s; "
             f"{_fmt(s['aborted_cycles'])} ended by a TCP reset)"),
            ("errors (cycles that failed; publish/notify errors)",
             f"{_fmt(s['errors'])}; {_fmt(s['publish_errors'])}/{_fmt(s['notify_errors'])}"),
            ("publications / notifications sent", f"{_fmt(s['published'])} / "
             f"{_fmt(s['notifications'])}"),
            ("shared channel: owed / received / lost",
             f"{_fmt(s['shared_expected'])} / {_fmt(s['shared_received'])} / "
             f"{_fmt(s['shared_lost'])}"),
            ("user channels: owed / received / lost",
             f"{_fmt(s['user_expected'])} / {_fmt(s['user_received'])} / "
             f"{_fmt(s['user_lost'])}"),
            ("duplicated / reordered / `reset` events", f"{_fmt(s['duplicated'])} / "
             f"{_fmt(s['reordered'])} / {_fmt(s['resets'])}"),
            ("connect + 2 subscribes p50 / p99 ms", f"{_fmt(s['setup_p50_ms'])} / "
             f"{_fmt(s['setup_p99_ms'])}"),
            ("delivery latency p50 / p99 ms, publish to the client decoding it (shared; user)",
             f"{_fmt(s['shared_p50_ms'])} / {_fmt(s['shared_p99_ms'])}; "
             f"{_fmt(s['user_p50_ms'])} / {_fmt(s['user_p99_ms'])}"),
            ("node RSS MB: start → after warm-up → end → clients gone (all nodes)",
             f"{s['rss_start_mb']} → {s['rss_warm_mb']} → {s['rss_end_mb']} → "
             f"{s['rss_after_mb']}"),
            ("node RSS slope after warm-up, MB/min (all nodes; worst node)",
             f"{_fmt(s['rss_slope_mb_per_min'], 3)}; "
             f"{_fmt(s['rss_slope_max_node_mb_per_min'], 3)} (flat: < "
             f"{s['max_slope_mb_per_min']:g} per node)"),
            ("the slope per cycle, bytes", _fmt(s["bytes_per_cycle"])),
            ("node descriptors: start → peak → end (all nodes)",
             f"{s['fds_start']} → {s['fds_peak']} → {s['fds_end']} "
             f"({_fmt(s['fds_settle_s'], 1)} s after the churn)"),
            ("Redis RSS MB: start → end", f"{s['redis_rss_start_mb']} → "
             f"{s['redis_rss_end_mb']}"),
            ("node CPU s (churn, publications, notifications); ms per cycle",
             f"{_fmt(s['server_cpu_s'])}; {_fmt(s['cpu_ms_per_cycle'], 2)}"),
        ]
        lines += _table(["measure", "value"], rows)
        lines += _table(["node", "RSS start MB", "after warm-up", "end", "clients gone",
                         "slope MB/min", "fit RMS MB", "fds start", "peak", "end"],
                        [[n["node"], n["rss_start_mb"], n["rss_warm_mb"], n["rss_end_mb"],
                          n["rss_after_mb"], _fmt(n["rss_slope_mb_per_min"], 3),
                          _fmt(n["fit_rms_mb"], 3), n["fds_start"], n["fds_peak"],
                          n["fds_end"]] for n in s.get("per_node", [])])
        checks = ", ".join(f"{k.replace('_', ' ')} {'✅' if v else '❌'}"
                           for k, v in s["checks"].items())
        lines += [f"Checks: {checks}.", ""]
        if s.get("error_samples"):
            lines += ["Errors: " + "; ".join(f"{n} x {reason}" for reason, n
                                             in s["error_samples"].items()), ""]
        if s.get("lost_samples"):
            lines += ["Lost (first cycles): " + "; ".join(
                f"{x['channel']} ({x['since']}, {x['until']}] missing {x['missing']}"
                for x in s["lost_samples"][:5]), ""]
    return lines


# -- plots ------------------------------------------------------------------------------------


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    """Latency vs rate, deliveries/s vs rate, memory vs connections; the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install -r "
                       "bench/requirements.txt)")
        return []
    written = []
    scenarios = results.get("scenarios", {})
    fanout = {t: d.get("summary", {}) for t, d in scenarios.get("fanout", {}).items()}
    fanout = {t: s for t, s in fanout.items() if s.get("steps")}
    if fanout:
        figure, axes = plt.subplots(figsize=(8, 5))
        for target, summary in fanout.items():
            rates = [s["rate"] for s in summary["steps"]]
            axes.plot(rates, [s["p50_ms"] for s in summary["steps"]], "o--",
                      label=f"{LABELS.get(target, target)} p50")
            axes.plot(rates, [s["p99_ms"] for s in summary["steps"]], "o-",
                      label=f"{LABELS.get(target, target)} p99")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("publishes/s on one channel")
        axes.set_ylabel("latency (ms)")
        axes.set_title(f"Fanout latency, {next(iter(fanout.values()))['subscribers']} "
                       "subscribers")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        written.append(_save(figure, out / "latency_vs_rate.png"))

        figure, axes = plt.subplots(figsize=(8, 5))
        top = 0.0
        for target, summary in fanout.items():
            offered = [s["offered_dps"] for s in summary["steps"]]
            achieved = [s["achieved_dps"] for s in summary["steps"]]
            top = max(top, *offered)
            axes.plot(offered, achieved, "o-", label=LABELS.get(target, target))
        axes.plot([0, top], [0, top], ":", color="grey", label="offered")
        axes.set_xlabel("offered deliveries/s")
        axes.set_ylabel("achieved deliveries/s")
        axes.set_title("Fanout throughput")
        axes.grid(True, alpha=0.3)
        axes.legend()
        written.append(_save(figure, out / "deliveries_vs_rate.png"))
    curves = {t: d.get("summary", {}).get("memory_curve")
              for t, d in scenarios.get("idle", {}).items()}
    curves = {t: c for t, c in curves.items() if c}
    if curves:
        figure, axes = plt.subplots(figsize=(8, 5))
        for target, curve in curves.items():
            axes.plot([c for c, _ in curve], [m for _, m in curve], "o-",
                      label=LABELS.get(target, target))
        axes.set_xlabel("connections on one node")
        axes.set_ylabel("node RSS (MB)")
        axes.set_title("Memory vs connections")
        axes.grid(True, alpha=0.3)
        axes.legend()
        written.append(_save(figure, out / "memory_vs_connections.png"))
    for target, data in scenarios.get("soak", {}).items():
        summary = data.get("summary", {})
        if summary.get("samples"):
            written.append(_plot_soak(plt, summary, out / f"soak_rss_{target}.png"))
    return written


def _plot_soak(plt: Any, summary: Mapping[str, Any], path: Path) -> Path:
    """Every node's RSS (with its fitted line) and descriptors over the soak."""
    samples = [s for s in summary["samples"] if s["phase"] != "after"]
    figure, (rss, fds) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    minutes = [s["t"] / 60 for s in samples]
    warmup, end = summary["warmup_s"] / 60, summary["duration_s"] / 60
    for index, node in enumerate(summary["per_node"]):
        line, = rss.plot(minutes, [s["rss_mb"][index] for s in samples], "-",
                         label=f"node {node['node']}: {_fmt(node['rss_slope_mb_per_min'], 3)}"
                               " MB/min after warm-up")
        if node["rss_slope_mb_per_min"] is not None:
            rss.plot([warmup, end], [node["fit_intercept_mb"]
                                     + node["rss_slope_mb_per_min"] * x for x in (warmup, end)],
                     ":", color=line.get_color())
        fds.plot(minutes, [s["fds"][index] for s in samples], "-", color=line.get_color())
    for axes in (rss, fds):
        axes.axvline(warmup, color="grey", linestyle="--", linewidth=0.8)
        axes.grid(True, alpha=0.3)
    rss.set_ylabel("node RSS (MB)")
    rss.set_title(f"Soak: {_fmt(summary['cycles'])} connect/subscribe/disconnect cycles, "
                  f"{summary['clients']} at a time (dashed: end of warm-up; dotted: fit)")
    rss.legend(loc="lower right")
    fds.set_ylabel("descriptors")
    fds.set_xlabel("minutes")
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
