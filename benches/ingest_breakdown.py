"""Where the Kafka ingest's CPU goes: samples of the ingest processes of ingest_bench, by stage.

    perf record -F 499 --call-graph dwarf,32768 -o ingest.perf \
        target/release/examples/ingest_bench 400000
    perf script -i ingest.perf -F comm,pid,tid,ip,sym | python3 benches/ingest_breakdown.py

The ingest processes are the ones with `ingest-writer-N` threads (the raw consumer and the
broker are left out). Each sample goes to the first stage whose frames appear on its stack:
decoding (JSON to an event), Parquet encoding (zstd included), Arrow building, the commit
(files, offsets, fsync, rename), librdkafka (its broker thread and the poll), the polling
thread's hand-off of records to the writers; what is left (copies and page faults whose stack
the unwinder cut short) is `other`.
"""
import collections
import re
import sys

STAGES = [
    ("decode", ("broadside_analytics::decode", "decode_event", "parse_rfc3339", "parse_from_rfc3339")),
    ("Parquet encode", ("parquet::", "ZSTD", "zstd")),
    ("Arrow build", ("arrow_", "EventBatch", "columns::", "push_record")),
    ("commit", ("commit", "fsync", "sync_file", "rename", "serde_json")),
    ("librdkafka", ("rd_kafka", "rdkafka::")),
    ("poll hand-off", ("run_kafka_ingest",)),
]

HEAD = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s*$")


def samples(lines):
    """(pid, comm, frames) per sample of `perf script` output."""
    head, frames = None, []
    for line in lines:
        if not line.strip():
            if head:
                yield head[0], head[1], frames
            head, frames = None, []
            continue
        m = HEAD.match(line)
        if head is None and m:
            head = (m.group(2), m.group(1))
        elif head:
            frames.append(line.strip())
    if head:
        yield head[0], head[1], frames


def stage(comm, frames):
    text = " ".join(frames)
    for name, marks in STAGES:
        if any(m in text for m in marks):
            return name
    return "librdkafka" if comm.startswith("rdk:") else "other"


def main():
    all_samples = list(samples(sys.stdin))
    ingest = {pid for pid, comm, _ in all_samples if comm.startswith("ingest-writer")}
    counts = collections.Counter(
        stage(comm, frames) for pid, comm, frames in all_samples if pid in ingest
    )
    total = sum(counts.values())
    if not total:
        sys.exit("no samples of an ingest process (threads named ingest-writer-N)")
    print(f"{total} samples of {len(ingest)} ingest processes")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f} %  {name}")


main()
