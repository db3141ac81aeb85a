"""DuckDB on the same raw Parquet as analytics_bench: one campaign's statistics and daily series,
and one recipient's events (newest first), a different recipient each run, as analytics_bench
picks them (pass the bench's recipient count as the fourth argument).

    python3 benches/analytics_duckdb.py /tmp/bench-store c042 5 [2000000]

The reference the analytics issue compares against (pip install duckdb). Prints median ms.
"""
import statistics
import sys
import time

import duckdb

store, campaign, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
recipients = int(sys.argv[4]) if len(sys.argv) > 4 else None
src = f"read_parquet('{store}/events/workspace_id=bench/*/*.parquet', hive_partitioning=true)"
con = duckdb.connect()
stats = f"""
SELECT variant, event_type, bounce_type, count(*) AS n,
       count(DISTINCT lower(trim(email))) FILTER (WHERE event_type IN ('opened','clicked')) AS u
FROM {src} WHERE campaign_id = ? GROUP BY ALL"""
series = f"""
SELECT CAST(date_trunc('day', ts) AS DATE) AS d, event_type, count(*) FROM {src}
WHERE campaign_id = ? GROUP BY ALL ORDER BY d"""
for name, q in [("statistics", stats), ("daily time series", series)]:
    times = []
    for i in range(runs + 1):
        t = time.perf_counter()
        con.execute(q, [campaign]).fetchall()
        if i:
            times.append((time.perf_counter() - t) * 1000)
    print(f"duckdb {name}: median {statistics.median(times):.0f} ms, min {min(times):.0f} ms")

if recipients:
    history = f"SELECT * FROM {src} WHERE lower(trim(email)) = ? ORDER BY ts DESC, event_id DESC"
    times = []
    for i in range(runs + 1):
        who = f"user{(1000 + 7919 * i) % recipients}@example.com"
        t = time.perf_counter()
        con.execute(history, [who]).fetchall()
        if i:
            times.append((time.perf_counter() - t) * 1000)
    print(f"duckdb one recipient's events: median {statistics.median(times):.0f} ms, min {min(times):.0f} ms")
