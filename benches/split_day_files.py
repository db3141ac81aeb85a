"""Lays a store's events out as a real ingest leaves them: each day's files rewritten as files of
5 500 events (zstd), in a new store, for the analytics benchmark's small-file layout.

    python3 benches/split_day_files.py STORE NEW_STORE [EVENTS_PER_FILE]

An ingest of 100 M events over 90 days wrote about 18 000 files of about 5 500 events; the
benchmark's generator writes one file per day. Reads and writes with pyarrow.
"""
import glob
import os
import sys

import pyarrow.parquet as pq

src, dst = sys.argv[1], sys.argv[2]
per_file = int(sys.argv[3]) if len(sys.argv) > 3 else 5500
files = 0
for ws in sorted(glob.glob(os.path.join(src, "events", "workspace_id=*"))):
    for day in sorted(glob.glob(os.path.join(ws, "date=*"))):
        out = os.path.join(dst, "events", os.path.basename(ws), os.path.basename(day))
        os.makedirs(out, exist_ok=True)
        table = pq.read_table(sorted(glob.glob(os.path.join(day, "*.parquet"))))
        for k, first in enumerate(range(0, table.num_rows, per_file)):
            pq.write_table(
                table.slice(first, per_file),
                os.path.join(out, f"part-{k:06d}.parquet"),
                compression="zstd",
                compression_level=1,
            )
            files += 1
print(f"{files} files")
