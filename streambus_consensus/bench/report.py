"""BENCHMARKS.md from the collected results: tables, targets beside the figures.

Everything is generated except the hand-written reading, which lives between
``<!-- reading:begin -->`` and ``<!-- reading:end -->`` and is carried over
from the existing file on every run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .common import command_in_words

__all__ = ["render", "target_rows"]

BEGIN, END = "<!-- reading:begin -->", "<!-- reading:end -->"
PLACEHOLDER = ("_Not written yet: read the tables below; which targets are met, which are "
               "not and why goes here._")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ops(row: dict[str, Any]) -> int | None:
    value = row.get("ops_per_s")
    return None if value is None else round(value)


def _load(section: dict[str, Any]) -> str:
    timing = section.get("timing") or {}
    if not timing:
        return ""
    return (f"\n\n_Section took {timing.get('seconds')} s; load average before "
            f"{timing.get('loadavg_before')}, after {timing.get('loadavg_after')}._")


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def _reading(existing: Path) -> str:
    try:
        text = existing.read_text(encoding="utf-8")
    except OSError:
        return PLACEHOLDER
    if BEGIN in text and END in text:
        return text.split(BEGIN, 1)[1].split(END, 1)[0].strip() or PLACEHOLDER
    return PLACEHOLDER


def _error(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    if "error" in section:
        return f"FAILED: {section['error']}"
    return None


# -- targets ------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _check_value(check: dict[str, Any]) -> str:
    """A target's figure: ratios as ``0.35x``, milliseconds as ``1.20 ms``."""
    value = check["value"]
    if isinstance(value, float) and "key" in check:
        return f"{value:.2f} ms" if check["key"].endswith("_ms") else f"{value:.2f}x"
    return _fmt(value)


def target_rows(results: dict[str, Any]) -> list[list[Any]]:
    """[target, figure, verdict] for every target with a figure in ``results``."""
    out: list[list[Any]] = []
    ov = results.get("overhead") or {}
    if "variants" in ov:
        for key, label in (("ours_vs_raw", "ours (fsync on)"),
                           ("ours_nofsync_vs_raw", "ours (fsync off)")):
            for ratio in ov[key]:
                thr, p50 = ratio.get("throughput_ratio"), ratio.get("p50_ratio")
                ok = None if thr is None else thr >= 0.9 and (p50 or 99) <= 1.0
                out.append([f"2. {label} >= 0.9x raw throughput at equal or better p50 "
                            f"({ratio['load']})",
                            f"{_fmt(thr, 2)}x, p50 {_fmt(p50, 2)}x", _met(ok)])
        for ratio in ov["fsync_vs_nofsync"]:
            thr = ratio.get("throughput_ratio")
            out.append([f"5. fsync on >= 0.7x fsync off throughput ({ratio['load']})",
                        f"{_fmt(thr, 2)}x", _met(None if thr is None else thr >= 0.7)])
    fo = results.get("failover") or {}
    if "failover_next_commit_s" in fo:
        commit = fo["failover_next_commit_s"]
        out.append(["3. failover to next committed write: median <= 0.6 s",
                    f"{commit['median']:.3f} s (n={commit['n']})", _met(commit["median"] <= 0.6)])
        out.append(["3. failover to next committed write: p99 <= 1.2 s",
                    f"{commit['p99']:.3f} s", _met(commit["p99"] <= 1.2)])
        out.append(["issue 2: leader elected, 1 node <= 1 s (from process start)",
                    f"{fo['leader_single_node_s']:.3f} s", _met(fo["leader_single_node_s"] <= 1)])
        out.append(["issue 2: leader elected, 3 nodes <= 2 s (from process start)",
                    f"{fo['leader_three_nodes_s']:.3f} s", _met(fo["leader_three_nodes_s"] <= 2)])
    idle = results.get("idle") or {}
    if "elections" in idle:
        out.append([f"3. elections while idle = 0 ({idle['seconds']:.0f} s watched)",
                    str(idle["elections"]), _met(idle["elections"] == 0)])
    sc = results.get("scale") or {}
    rows = sc.get("rows", [])
    base = _find(rows, partitions=0)
    big = max(rows, key=lambda r: r["partitions"]) if rows else None
    if big is not None and big["partitions"] > 0:
        where = f"{big['partitions']:,} partitions"
        mark = "" if big["partitions"] >= 1_000_000 else " (target is set at 1M)"
        out.append([f"4. restart-to-ready <= 15 s at {where}{mark}",
                    f"{big['restart_to_ready_s']} s", _met(big["restart_to_ready_s"] <= 15)])
        rss = max(big["rss_mb"].values())
        out.append([f"4. RSS per node <= 1.5 GB at {where}{mark}", f"{rss:,.0f} MB",
                    _met(rss <= 1536)])
        if base is not None and base["create_topic"].get("p50_ms"):
            ratio = big["create_topic"]["p50_ms"] / base["create_topic"]["p50_ms"]
            out.append([f"4. create_topic p50 within 2x of the empty cluster at {where}{mark}",
                        f"{big['create_topic']['p50_ms']:.2f} ms vs "
                        f"{base['create_topic']['p50_ms']:.2f} ms ({ratio:.2f}x)",
                        _met(ratio <= 2.0)])
        out.append([f"4. no leader change while a new member catches up ({where})",
                    str(big.get("catch_up_elections")),
                    _met(big.get("catch_up_elections") == 0)])
    for key, issue in (("etcd", "issue 10"), ("flood", "issue 10")):
        section = results.get(key) or {}
        if "skipped" in section:
            out.append([f"{issue}: side by side with etcd", f"skipped: {section['skipped']}",
                        "-"])
        for check in section.get("targets", []):
            out.append([f"{issue}: {check['target']}", _check_value(check),
                        _met(check["met"])])
    lat = (results.get("latency") or {}).get("rows", [])
    for path in ("embedded", "http"):
        one = _find(lat, path=path, nodes=3, op="create_topic", callers=1)
        many = _find(lat, path=path, nodes=3, op="create_topic", callers=32)
        if one and "p50_ms" in one:
            out.append([f"issue 3: create_topic 1 caller p50 <= 1 ms, p99 <= 3 ms ({path}, 3 "
                        "nodes)", f"p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms",
                        _met(one["p50_ms"] <= 1.0 and one["p99_ms"] <= 3.0)])
        if many and "ops_per_s" in many:
            out.append([f"issue 3: >= 10,000 creates/s with 32 callers ({path}, 3 nodes)",
                        f"{many['ops_per_s']:,.0f}/s", _met(many["ops_per_s"] >= 10_000)])
    bulk = results.get("bulk") or {}
    out += _bulk_targets(bulk)
    return out


# -- sections -----------------------------------------------------------------------


def _latency(section: dict[str, Any]) -> str:
    rows = [[r["nodes"], r["path"], r["op"], r["callers"], _ops(r), r.get("p50_ms"),
             r.get("p99_ms"), r.get("max_ms"),
             ", ".join(f"{k} {v}" for k, v in r.get("errors", {}).items()) or "-"]
            for r in section["rows"]]
    return (f"{section['seconds_per_point']} s per point after a 0.3 s warm-up. "
            "`http`: a new connection per request, as `ApiClient` does; `http-keepalive`: "
            "one kept connection. `embedded`: the bench process is a voting member and the "
            "leader; callers call `MetadataStore` directly. Six brokers, three racks; "
            "create_topic = a new topic of 3 partitions, RF 3; the read is "
            "`describe_topic(linearizable=True)`, a read command through the log.\n\n"
            + _table(["nodes", "path", "operation", "callers", "ops/s", "p50 ms", "p99 ms",
                      "max ms", "errors"], rows))


def _overhead(section: dict[str, Any]) -> str:
    rows = []
    for name, variant in section["variants"].items():
        for r in variant:
            load = f"{r['callers']} callers" if "callers" in r else f"window {r['window']}"
            rows.append([name, load, _ops(r), r.get("p50_ms"), r.get("p99_ms"),
                         r.get("max_ms"), r.get("fsync_groups"),
                         "yes" if r.get("term_changed") else "no"])
    ratios = []
    for a, b, c in zip(section["ours_vs_raw"], section["ours_nofsync_vs_raw"],
                       section["fsync_vs_nofsync"], strict=True):
        ratios.append([a["load"], a.get("throughput_ratio"), a.get("p50_ratio"),
                       b.get("throughput_ratio"), b.get("p50_ratio"),
                       c.get("throughput_ratio"), c.get("p50_ratio")])
    return (f"Three-process loopback clusters; the leader runs the load on itself (no HTTP). "
            f"Every write carries the same encoded create_topic command bytes into a dict. "
            f"{section['seconds_per_point']} s per point; median of {section['repeats']} "
            f"runs in rotated order. `window N`: N writes kept in flight (saturation). "
            f"Timeouts, batching (off), queue size and compaction threshold are our "
            f"defaults for both; raw PySyncObj journals to a page-cache mmap and never "
            f"fsyncs, and its transport is pickle without authentication (ours: our codec "
            f"and HMAC on every frame).\n\n"
            + _table(["variant", "load", "ops/s", "p50 ms", "p99 ms", "max ms",
                      "fsync groups", "leader changed"], rows)
            + "\n\nRatios (throughput: higher is better; p50: lower is better):\n\n"
            + _table(["load", "ours/raw thr.", "ours/raw p50", "ours-nofsync/raw thr.",
                      "ours-nofsync/raw p50", "fsync on/off thr.", "fsync on/off p50"],
                     ratios))


def _durability(section: dict[str, Any]) -> str:
    floor = section["fsync_floor"]
    rows = [[r["load"], r.get("throughput_ratio"), r.get("p50_ratio"), r.get("p99_ratio")]
            for r in section["fsync_vs_nofsync"]]
    return ("Same run as section 2: `ours` (fsync on, the default) against `ours-nofsync` "
            "(page cache only). Target: fsync on >= 0.7x fsync off throughput.\n\n"
            + _table(["load", "throughput on/off", "p50 on/off", "p99 on/off"], rows)
            + f"\n\nFloor: the data disk's own append + fdatasync of {floor['bytes']} bytes: "
            f"p50 {floor.get('p50_ms')} ms, p99 {floor.get('p99_ms')} ms, max "
            f"{floor.get('max_ms')} ms (n={floor['n']}). Each group commit of the WAL costs "
            "two of these in sequence (records, then the header that declares them), on the "
            "leader and then on the followers before they acknowledge.")


def _failover(section: dict[str, Any], idle: dict[str, Any] | None) -> str:
    nl, nc = section["failover_new_leader_s"], section["failover_next_commit_s"]
    rows = [
        ["leader elected, 1 node, from process start", section["leader_single_node_s"], "<= 1.0"],
        ["leader elected, 3 nodes, from process start", section["leader_three_nodes_s"],
         "<= 2.0"],
        [f"SIGKILL of the leader -> new leader agreed (n={nl['n']}): median / p99 / max",
         f"{nl['median']:.3f} / {nl['p99']:.3f} / {nl['max']:.3f}", "-"],
        [f"SIGKILL of the leader -> next write committed (n={nc['n']}): median / p99 / max",
         f"{nc['median']:.3f} / {nc['p99']:.3f} / {nc['max']:.3f}", "median <= 0.6, p99 <= 1.2"],
    ]
    if "silent_failover_next_commit_s" in section:
        sl, sc = section["silent_failover_new_leader_s"], section["silent_failover_next_commit_s"]
        rows.append([f"SIGSTOP of the leader (silent) -> new leader agreed (n={sl['n']}): "
                     "median / p99 / max",
                     f"{sl['median']:.3f} / {sl['p99']:.3f} / {sl['max']:.3f}", "-"])
        rows.append([f"SIGSTOP of the leader (silent) -> next write committed (n={sc['n']}): "
                     "median / p99 / max",
                     f"{sc['median']:.3f} / {sc['p99']:.3f} / {sc['max']:.3f}",
                     "median <= 0.6, p99 <= 1.0"])
    if "terms_per_failover" in section:
        rows.append(["new terms per failover {terms: rounds}",
                     json.dumps(section["terms_per_failover"]), "all 1"])
    if "rejoins" in section:
        rj = section["rejoins"]
        rows.append([f"elections caused by {rj['rounds']} rejoins of a follower cut off for "
                     "2-5 election timeouts", rj["elections"], "0"])
    if idle and "elections" in idle:
        where = ("while the other sections ran" if idle.get("concurrent_with_other_sections")
                 else "alone")
        rows.append([f"elections in an idle 3-node cluster, {idle['seconds']:.0f} s watched "
                     f"{where}", idle["elections"], "0"])
    writes = section.get("writes", {})
    return (f"Three metadata node processes; a writer starts a create_topic (1 partition, "
            f"RF 3) every 50 ms, each on its own thread, to any running node "
            f"({writes.get('total', '?')} writes, "
            f"{writes.get('failed', '?')} failed and retried during failovers). Times in "
            "seconds, from the SIGKILL or SIGSTOP. The killed node is restarted (the paused one "
            "resumed) and caught up before the next round. p99 of 20 samples is their maximum.\n\n"
            + _table(["measure", "seconds", "target"], rows))


def _bulk_targets(bulk: dict[str, Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    batched = (bulk.get("batched") or {}).get("batched") or {}
    if batched.get("topics_per_s") is not None:
        out.append(["issue 10: >= 20,000 topics/s created in batches of 100 (3 partitions, RF 3)",
                    f"{batched['topics_per_s']:,.0f} topics/s",
                    _met(batched["topics_per_s"] >= 20_000)])
    large = bulk.get("large") or {}
    fence = large.get("fence") or {}
    if fence:
        where = f"{large['partitions']:,} partitions"
        mark = "" if large["partitions"] >= 1_000_000 else " (target is set at 1M)"
        delivered = fence.get("all_delivered_s")
        out.append([f"issue 10: fence committed and at every node's watcher <= 3 s ({where}){mark}",
                    f"committed {fence['commit_s']:.2f} s, delivered {_fmt(delivered)} s",
                    _met(None if delivered is None else delivered <= 3.0)])
        out.append([f"issue 14: 0 elections during the fence ({where}){mark}",
                    str(fence["elections"]), _met(fence["elections"] == 0)])
    big = large.get("large_create") or {}
    if big:
        out.append([f"issue 14: 0 elections during a {big['partitions']:,}-partition create",
                    f"{big['elections']} ({big['seconds']:.2f} s)", _met(big["elections"] == 0)])
    return out


def _bulk(section: dict[str, Any]) -> str:
    parts = []
    b = section.get("batched") or {}
    if b:
        single, batched = b["single_create"], b["batched"]
        parts.append(
            f"Batched creates: `POST /v1/topics:batch`, {b['batch_size']} topics a batch "
            f"(3 partitions, RF 3, 6 brokers in 3 racks), {b['callers']} keep-alive callers "
            "to the leader of a 3-node cluster (fsync on), beside single `POST /v1/topics` "
            "creates with as many callers.\n\n"
            + _table(["mode", "topics", "seconds", "topics/s", "p50 ms (a call)",
                      "p99 ms (a call)", "elections"],
                     [["single", single.get("n"), single.get("seconds"),
                       single.get("ops_per_s"), single.get("p50_ms"), single.get("p99_ms"), "-"],
                      ["batches of 100", batched["topics"], batched["seconds"],
                       batched["topics_per_s"], batched["batch_latency"].get("p50_ms"),
                       batched["batch_latency"].get("p99_ms"), batched["elections"]]]))
    large = section.get("large") or {}
    if large:
        fence, big = large["fence"], large["large_create"]
        parts.append(
            f"Fence at scale: {large['partitions']:,} partitions (100 per topic, RF 3) on 3 "
            "brokers, built offline and installed as each member's snapshot; broker 0 (a "
            "replica of every partition, leader of a third) is fenced with `POST "
            "/v1/brokers/0/fence`. Committed: that call's answer. Delivered: a watcher on "
            "each node (`GET /v1/watch?format=compact`, long-polling since before the fence) "
            "has every changed partition. Elections: term changes seen meanwhile and "
            "3 s after. Then broker 0 is unfenced and one topic of the documented maximum "
            "size is created (`POST /v1/topics:batch`).\n\n"
            + _table(["change", "partitions changed", "committed s", "delivered s, per node",
                      "all delivered s", "elections"],
                     [["fence broker 0", fence["changed_partitions"], fence["commit_s"],
                       ", ".join(f"{n} {_fmt(v)}" for n, v in fence["delivered_s"].items()),
                       fence["all_delivered_s"], fence["elections"]],
                      [f"create a {big['partitions']:,}-partition topic", big["partitions"],
                       big["seconds"], "-", "-", big["elections"]]]))
    return "\n\n".join(parts)


def _scale(section: dict[str, Any]) -> str:
    rows = []
    for r in section["rows"]:
        off = r["offline"]
        snap = r.get("cluster_snapshot", {})
        rows.append([r["partitions"], r["topics"], off["file_bytes"] / 1e6, off["build_s"],
                     off["encode_s"], snap.get("seconds"), off.get("restore_s"),
                     r["cold_start_all_s"], r["restart_to_ready_s"], r.get("restart_elections"),
                     r["catch_up_s"], r["catch_up_elections"], max(r["rss_mb"].values()),
                     r.get("rss_mb_new_member"), r["create_topic"].get("p50_ms"),
                     r["create_topic"].get("p99_ms"), off.get("full_gc_pause_s"),
                     off.get("full_gc_pause_after_freeze_s"), r.get("metrics_scrape_s")])
    return ("**How the state was built**: offline, in a child process, a "
            "`MetadataStateMachine` applied the real commands (100 brokers in 5 racks "
            "registered active, then N/100 `CreateTopic` of 100 partitions each, RF 3) "
            "through its normal `apply_at`; its snapshot, packed in the node snapshot format "
            "with the three members and term 1, was written with `DiskStorage` as each "
            "member's `snapshot.bin` before the nodes started (so every start is a restart "
            "from disk). The new member of the catch-up column is added with "
            "`POST /v1/members` and receives the leader's snapshot over the wire.\n\n"
            "Columns: snapshot file size; offline build (apply) time; snapshot encode time "
            "(offline) and the leader's in-cluster snapshot (capture + encode + write + "
            "fsync, background thread); `MetadataStateMachine.restore` alone; cold start of "
            "all 3 members together; restart-to-ready of one member (SIGKILL, start, until "
            "it has applied the leader's commit index) and the elections (term bumps) the "
            "other members saw meanwhile and 3 s after; catch-up of a new empty member "
            "(add request until applied) and the elections seen during it and 5 s after; "
            "largest RSS of the 3 members and of the new one; create_topic "
            f"over HTTP, 1 caller, {section['creates']} calls (3 partitions, RF 3); a full "
            "garbage collection's pause with the state loaded, without and with "
            "`gc.freeze()` (build process); one Prometheus scrape of the leader's /metrics.\n\n"
            + _table(["partitions", "topics", "snapshot MB", "build s", "encode s",
                      "leader snapshot s", "restore s", "cold start s", "restart s",
                      "elections (restart)", "catch-up s", "elections (catch-up)", "RSS MB",
                      "new RSS MB", "create p50 ms", "create p99 ms", "full GC s",
                      "GC after freeze s", "scrape s"], rows))


def _profile(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"Skipped: {section['skipped']}."
    parts = [f"`py-spy record --gil` at {section['rate_hz']} Hz for {section['seconds']} s "
             "on the leader process: only the thread holding the GIL is sampled, i.e. the "
             "work that serializes a Python process (time blocked in fsync or select is not "
             "in it). µs/op = that category's GIL time divided by the operations committed "
             "while sampling."]
    for key in ("consensus", "metadata_http"):
        p = section.get(key)
        if not p:
            continue
        parts.append(f"**{p['load']}**: {p['ops_per_s']} ops/s, GIL held "
                     f"{p['gil_busy_fraction']:.0%} of the time "
                     f"({p['samples']} samples).\n\n"
                     + _table(["category", "share of GIL time", "µs per committed op"],
                              [[c["category"], f"{c['share']:.0%}", c["us_per_op"]]
                               for c in p["categories"]])
                     + "\n\nTop functions (self time):\n\n"
                     + _table(["function", "share"],
                              [[f["function"].replace("|", "/"), f"{f['share']:.1%}"]
                               for f in p["top_functions"][:10]]))
    return "\n\n".join(parts)


def _tls(section: dict[str, Any]) -> str:
    rows = [[r["callers"], r["plain"]["ops_per_s"], r["plain"]["p50_ms"], r["tls"]["ops_per_s"],
             r["tls"]["p50_ms"], r["throughput_ratio"], r["p50_ratio"]]
            for r in section["rows"]]
    return ("create_topic over HTTP (3 partitions, RF 3) on two three-node clusters running "
            "side by side, one plain and one with mutual TLS for peers and the API, in "
            f"{section['rounds']} alternating round(s) of {section['seconds']} s per level; "
            "medians of the rounds. Callers keep their connections alive (ApiClient's pool), "
            "so the TLS handshake is paid once per connection.\n\n"
            + _table(["callers", "plain ops/s", "plain p50 ms", "TLS ops/s", "TLS p50 ms",
                      "TLS/plain throughput", "TLS/plain p50"], rows))


_ETCD_ROWS = (
    ("create_topic ops/s, {n} callers", "create_many", "ops_per_s", "higher"),
    ("create_topic p50 ms, {n} callers", "create_many", "p50_ms", "lower"),
    ("create_topic, 1 caller, p50 ms", "create_one", "p50_ms", "lower"),
    ("create_topic, 1 caller, p99 ms", "create_one", "p99_ms", "lower"),
    ("linearizable read ops/s, {n} callers", "read_many", "ops_per_s", "higher"),
    ("linearizable read, 1 caller, p50 ms", "read_one", "p50_ms", "lower"),
    ("linearizable read, 1 caller, p99 ms", "read_one", "p99_ms", "lower"),
)


def _versus(value: Any, etcd: Any) -> str:
    if not isinstance(value, int | float) or not isinstance(etcd, int | float) or not etcd:
        return _fmt(value)
    return f"{_fmt(value)} ({value / etcd:.2f}x)"


def _etcd(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"Skipped: {section['skipped']}."
    figs, n = section["figures"], section["callers"]
    rows = []
    for label, point, key, better in _ETCD_ROWS:
        e = figs["etcd"][point].get(key)
        rows.append([label.format(n=n), f"{better} is better", _fmt(e),
                     _versus(figs["http"][point].get(key), e),
                     _versus(figs["embedded"][point].get(key), e)])
    cpu = [c for point in figs["etcd"].values() for r in point["rounds"]
           for c in r.get("client_cpu", []) if c is not None]
    per_round = [[system, point, r["round"], _ops(r), r.get("p50_ms"), r.get("p99_ms"),
                  ", ".join(f"{k} {v}" for k, v in r.get("errors", {}).items()) or "-",
                  ", ".join(f"{c:.0%}" for c in r.get("client_cpu", [])) or "-"]
                 for system, points in figs.items() for point, fig in points.items()
                 for r in fig["rounds"]]
    terms = section.get("term_changes", {})
    return (f"{section['etcd_version']} ({section['etcd_found']}), three members on loopback "
            "with its defaults (fsync on), against our three-node metadata cluster over HTTP "
            "and our store embedded in the bench process as the leader (two node processes "
            f"follow); all three up for the whole section, {section['rounds']} round(s) of "
            f"{section['seconds']} s per point (after a 0.3 s warm-up) in the order etcd, "
            "ours over HTTP, ours embedded"
            + (", then the load generator ceilings (below)" if section.get("ceiling") else "")
            + "; figures are medians of the rounds, ratios are ours / etcd.\n\n"
            "create: ours = `create_topic` of a new topic (3 partitions, RF 3, six brokers "
            "in three racks); etcd = a txn that puts `topics/NAME` only if it does not exist "
            "(compare `create_revision == 0`), as a create must not overwrite, with a value "
            f"of {section['etcd_value_bytes']} bytes (the JSON record of such a topic; our "
            f"create command is {section['our_create_command_bytes']} bytes). read: ours = "
            "`describe_topic(linearizable=True)` (`GET /v1/topics/NAME?linearizable=1`); "
            "etcd = `/v3/kv/range` of one key, `serializable` false (its default). "
            "etcd is reached through its v3 JSON gateway; over HTTP both systems get the "
            f"same callers: {section['client_procs']} worker processes of threads, one "
            "kept-alive `http.client` connection per caller (`ApiClient` for ours), aimed "
            "at the leader. Embedded callers are threads of the bench process.\n\n"
            + _table(["figure", "", "etcd", "ours over HTTP (vs etcd)",
                      "ours embedded (vs etcd)"], rows)
            + "\n\nTargets (issue 10): over HTTP create_topic >= 2x etcd at "
            f"{n} callers, linearizable reads >= 3x, 1-caller create p50 <= etcd's; embedded "
            f"create_topic >= 3x etcd at {n} callers and 1-caller p50 <= 1.5 ms.\n\n"
            + _table(["target", "figure", "verdict"],
                     [[c["target"], _check_value(c), _met(c["met"])]
                      for c in section["targets"]])
            + f"\n\nThe client side: each HTTP worker process used at most "
            f"{max(cpu, default=0):.0%} of a core during the etcd points, so "
            + ("**the client may have capped etcd's figures** (a worker above 80 %: run with "
               "more worker processes)" if max(cpu, default=0) > 0.8 else
               "the Python client did not cap etcd's figures (a worker above 80 % would)")
            + "; the machine's cores are shared by servers and clients alike. Raft term "
            "changes during the section: "
            + ", ".join(f"{k} {v}" for k, v in terms.items()) + "."
            + _etcd_ceiling(section) + "\n\nEvery round:\n\n"
            + _table(["system", "point", "round", "ops/s", "p50 ms", "p99 ms", "errors",
                      "client CPU per worker"], per_round))


_CEILING_POINTS = (("create_many", "create, {n} callers"), ("create_one", "create, 1 caller"),
                   ("read_many", "linearizable read, {n} callers"),
                   ("read_one", "linearizable read, 1 caller"))


def _etcd_ceiling(section: dict[str, Any]) -> str:
    """The load generator's ceiling beside etcd's and our HTTP figures."""
    ceiling, figs = section.get("ceiling"), section["figures"]
    if not ceiling:
        return ""

    def server_cpu(system: str, point: str) -> float | None:
        values = [r["server_cpu"] for r in figs.get(system, {}).get(point, {}).get("rounds", [])
                  if isinstance(r.get("server_cpu"), int | float)]
        return max(values) if values else None

    rows = []
    for point, label in _CEILING_POINTS:
        row = ceiling.get(point, {})
        cpus = [c for c in (server_cpu("etcd_ceiling", point), server_cpu("http_ceiling", point))
                if c is not None]
        top = figs.get("http_ceiling", {}).get(point, {}).get("p50_ms")
        rows.append([label.format(n=section["callers"]), _fmt(row.get("etcd_ops_per_s")),
                     _versus(row.get("etcd_ceiling_ops_per_s"), row.get("etcd_ops_per_s")),
                     _fmt(row.get("http_ops_per_s")),
                     _versus(row.get("http_ceiling_ops_per_s"), row.get("http_ops_per_s")),
                     _fmt(top), ", ".join(f"{c:.0%}" for c in cpus) or "-"])
    sizes = section.get("ceiling_answer_bytes", {})
    return ("\n\n**Load generator ceiling.** The same callers (the same worker processes "
            "and threads, at the same caller counts) pointed at a server in a process of its "
            "own that answers every request at once with the bytes etcd or our node sent for "
            "that kind of request, captured once at set-up ("
            + ", ".join(f"`{k.strip()}` {v} B" for k, v in sizes.items())
            + "): the most ops/s these callers can drive on this machine when the server "
            "does no work, its own CPU shown. The ratio is ceiling / measured: near 1x, that "
            "figure is the callers' limit, not the server's.\n\n"
            + _table(["point", "etcd ops/s", "ceiling, etcd's callers (ceiling / etcd)",
                      "ours over HTTP ops/s", "ceiling, our callers (ceiling / ours)",
                      "our callers' p50 ms at the ceiling", "canned server CPU"], rows))


def _flood(section: dict[str, Any]) -> str:
    phase, limited = section.get("flood") or {}, section.get("fd_limit") or {}
    parts = ["A three-node metadata cluster (node processes, fsync on). A writer starts a "
             f"`create_topic` (3 partitions, RF 3) every {section['write_every_s'] * 1e3:.0f} "
             "ms through an `ApiClient` given every node, the leader first. Then a separate "
             "process opens the connections at once to the leader's API, sends one "
             "`GET /healthz` on each and holds them open, "
             + (f"each sending another `GET /healthz` every {section['ping_s']:g} s "
                "(staggered; below the API's 10 s idle timeout) as a polling client would, "
                if section.get("ping_s") else "silent, ")
             + "reopening any the node cuts one second later. Every 0.5 s each node's term "
             "is read from `/v1/status` and the flooded node's RSS, open fds and CPU time "
             "from `/proc`."]
    if phase:
        fl, w, wb = phase["flooder"], phase["writer"], phase["writer_baseline"]
        parts.append(_table(["measure", "value"], [
            ["connections held (asked / all open after / peak / open at the end)",
             f"{fl['count']:,} / {_fmt(fl['first_all_open_s'])} s / {fl['peak_open']:,} / "
             f"{fl['open_at_end']:,}"],
            ["window", f"{phase['seconds']:.0f} s"],
            ["requests sent on held connections after the first", f"{fl.get('pings', 0):,}"],
            ["connections cut by the node (open for at least / median s before the cut) / "
             "connect failures / timeouts",
             f"{fl['cut']:,} ({_fmt(fl.get('cut_age_min_s'))} / "
             f"{_fmt(fl.get('cut_age_median_s'))}) / {fl['connect_failed']:,} / "
             f"{fl['connect_timeouts']:,}"],
            ["Raft term before / at the end of the hold / "
             f"{_fmt(phase.get('closing_seconds'), 0)} s later, once the connections closed "
             "(a rise is an election)",
             f"{phase.get('term_before')} / {phase.get('term_after')} / "
             f"{_fmt(phase.get('term_after_closing'))}"],
            ["status requests the nodes did not answer (per node)",
             json.dumps(phase.get("status_unanswered", {}))],
            ["writer during the flood: writes, p50 / p99 / max ms, errors",
             f"{w['n']:,}, {_fmt(w.get('p50_ms'))} / {_fmt(w.get('p99_ms'))} / "
             f"{_fmt(w.get('max_ms'))}, {w['errors']}"],
            ["writer while the connections closed: p50 / p99 / max ms, errors",
             f"{_fmt((phase.get('writer_closing') or {}).get('p50_ms'))} / "
             f"{_fmt((phase.get('writer_closing') or {}).get('p99_ms'))} / "
             f"{_fmt((phase.get('writer_closing') or {}).get('max_ms'))}, "
             f"{(phase.get('writer_closing') or {}).get('errors', '-')}"],
            ["writer before the flood (baseline): p50 / p99 ms",
             f"{_fmt(wb.get('p50_ms'))} / {_fmt(wb.get('p99_ms'))}"],
            ["flooded node RSS: before / peak / at the end of the hold MB; growth over the "
             "second half of the hold / with the writer alone before",
             f"{_fmt(phase.get('rss_before_mb'))} / {_fmt(phase.get('rss_peak_mb'))} / "
             f"{_fmt(phase.get('rss_end_mb'))}; "
             f"{_fmt(phase.get('rss_second_half_mb_per_min'), 1)} / "
             f"{_fmt(phase.get('rss_before_mb_per_min'), 1)} MB/min"],
            ["flooded node RSS while the connections were held (MB)",
             " ".join(f"{v:.0f}" for v in phase.get("rss_series_mb", []))],
            ["flooded node open fds: peak / at the end of the hold",
             f"{phase.get('fds_peak')} / {phase.get('fds_end')}"],
            ["flooded node CPU while the connections were held",
             f"{_fmt(phase.get('cpu_percent'), 1)} %"],
        ]))
    if limited:
        fl, w = limited["flooder"], limited["writer"]
        parts.append(f"**Open-file limit {limited['nofile']}**: the leader's `RLIMIT_NOFILE` "
                     "lowered on the running process (`prlimit`) "
                     + ("" if limited.get("node_role", "leader") == "leader" else
                        "(a new leader: the leadership changed after the flood) ")
                     + "then "
                     f"{limited['connections']} connections for {limited['seconds']:.0f} s. "
                     "Accept-failure lines are the node's new log lines that mention "
                     "accept, EMFILE or 'too many open files'.\n\n" + _table(
                         ["measure", "value"], [
                             ["connections open at the end, as the client sees them (the "
                              "kernel completes handshakes into the listen backlog) / cut",
                              f"{fl['open_at_end']} / {fl['cut']}"],
                             ["node log lines in the window (all / accept failures / "
                              "ERROR or CRITICAL)", f"{limited['log_lines']:,} / "
                              f"{limited['accept_failure_lines']:,} / "
                              f"{limited['error_lines']:,}"],
                             ["unhandled-exception reports in the log (socketserver): "
                              "count, exception types",
                              f"{limited.get('unhandled_exceptions', '-')}, " + (", ".join(
                                  f"{n}x {t}" for t, n in
                                  limited.get("exception_types", {}).items()) or "-")],
                             ["commonest new log lines", "; ".join(
                                 f"{n}x {shape.replace('|', '/')[:90]}"
                                 for shape, n in limited.get("commonest_lines", []))],
                             ["node CPU during the window",
                              f"{_fmt(limited.get('cpu_percent'), 1)} %"],
                             ["open fds: peak", limited.get("fds_peak")],
                             ["elections", limited["elections"]],
                             ["writer: p50 / p99 ms, errors", f"{_fmt(w.get('p50_ms'))} / "
                              f"{_fmt(w.get('p99_ms'))}, {w['errors']}"],
                         ]))
    parts.append(_table(["target", "figure", "verdict"],
                        [[c["target"], _check_value(c), _met(c["met"])]
                         for c in section.get("targets", [])]))
    return "\n\n".join(parts)


def render(meta: dict[str, Any], results: dict[str, Any], existing: Path,
           results_dir: Path) -> str:
    """The whole BENCHMARKS.md."""
    machine, ver = meta["machine"], meta["versions"]
    disk = machine["disk"]
    rel = os.path.relpath(results_dir, existing.parent)
    head = [
        "# Benchmarks",
        "",
        f"Generated by `make bench{' QUICK=1' if meta['mode'] == 'quick' else ''}` "
        f"({meta['mode']} run) on {meta['date']}; machine-readable results with the same "
        f"description are in `{rel}/*.json`. Every comparison below is between figures of "
        "this one run.",
        "",
        f"- **command**: `{command_in_words(meta['command'])}`",
        f"- **machine**: {'a virtual machine' if machine.get('virtual') else 'a machine'} "
        f"with {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB memory, {machine['kernel']}; the data directories "
        f"on {disk['fs']} on a disk sysfs calls {disk['kind']}",
        f"- **versions**: Python {ver['python']}, PySyncObj {ver['pysyncobj']}, "
        f"streambus-consensus {ver['streambus_consensus']} (commit {ver['git_commit']})",
        f"- **load average** (1/5/15 min) at start {meta['loadavg_at_start']}, at end "
        f"{meta.get('loadavg_at_end')}: other work on a shared machine moves every figure; "
        f"the run took {meta.get('total_seconds', 0):.0f} s",
        "",
        "## Reading",
        "",
        BEGIN,
        _reading(existing),
        END,
        "",
        "## Targets at a glance",
        "",
        _table(["target", "figure", "verdict"], target_rows(results)),
    ]
    body: list[str] = []
    sections = [
        ("1. Latency and throughput: create_topic and linearizable reads", "latency", _latency),
        ("2. Adapter overhead: raw PySyncObj against RaftNode", "overhead", _overhead),
        ("3. Failover and idle elections", "failover",
         lambda s: _failover(s, results.get("idle"))),
        ("4. Scale: 10k, 100k and 1M partitions", "scale", _scale),
        ("5. Durability cost: fsync on against page cache only", "overhead", _durability),
        ("6. Profile: where the time goes per committed operation", "profile", _profile),
        ("7. TLS cost: mutual TLS against plain TCP", "tls", _tls),
        ("8. Bulk: batched creates, a broker fenced in 1M partitions, a 100k-partition "
         "create", "bulk", _bulk),
        ("9. Side by side with etcd: create_topic and linearizable reads", "etcd", _etcd),
        ("10. Connection flood: many clients on one node while writes go on", "flood", _flood),
    ]
    for title, key, fn in sections:
        body += ["", f"## {title}", ""]
        section = results.get(key)
        problem = _error(section)
        body.append(problem if problem else fn(section) + _load(section))  # type: ignore[arg-type]
    return "\n".join(head + body) + "\n"
