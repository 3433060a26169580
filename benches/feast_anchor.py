"""Feast anchor for benches/feature_store.rs: the same pump-readings workload in Feast.

usage: feast_anchor.py [--entities N] [--pumps N] [--readings N] [--labels N] [--lookups N]
                       [--warmup N] [--seed N] [--keep DIR]

Builds a local Feast repo in a temporary directory, as `feast init` would lay it out: the
local provider, the file (Dask) offline store reading Parquet, the SQLite online store and
a file registry. Two feature views share one entity (`pump`, join key `pump_id`) and the
same 10 features (site and technician as String, 8 sensors as Float32):

- `pump_snapshot`: ENTITIES pumps x 1 reading. Materialized into SQLite (Feast's counterpart
  of our snapshot build), then read back one random entity per call with
  `get_online_features` (our in-process lookup), with and without `.to_dict()`.
- `pump_history`: PUMPS pumps x READINGS hourly readings. LABELS labels (a random pump, a
  random time within the readings' hours, a 0/1 `failed` column) are joined point-in-time
  with `get_historical_features(...).to_df()` (our point-in-time export).

Progress goes to stderr; the figures go to stdout as a Markdown table for BENCHMARKS.md,
followed by the Feast and Python versions.
"""

import argparse
import contextlib
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import feast
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, String

# Same first reading as benches/feature_store.rs: START = 1_790_000_000 s after the epoch.
START = datetime.fromtimestamp(1_790_000_000, tz=timezone.utc)
HOUR = timedelta(hours=1)
MIB = 1024.0 * 1024.0
SENSORS = [
    "temperature_c",
    "vibration_mm_s",
    "pressure_bar",
    "current_a",
    "rpm",
    "humidity_pct",
    "voltage_v",
    "acoustic_db",
]
FEATURES = ["site", "technician"] + SENSORS
TECHNICIANS = np.array(["amal", "bilal", "chen", None], dtype=object)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def pump_ids(n):
    return np.array([f"pump-{i:06}" for i in range(n)], dtype=object)


def write_readings(path, pumps, readings, rng):
    """PUMPS x READINGS rows, hour-major like the Rust bench: row i is pump i % pumps at
    hour i // pumps. Writes one Parquet file (snappy) and returns the row count."""
    ids = pump_ids(pumps)
    pump = np.tile(np.arange(pumps), readings)
    hour = np.repeat(np.arange(readings), pumps)
    start_us = int(START.timestamp()) * 1_000_000
    columns = {
        "pump_id": pa.array(np.tile(ids, readings), pa.string()),
        "event_time": pa.array(
            start_us + hour.astype(np.int64) * 3_600_000_000, pa.timestamp("us", tz="UTC")
        ),
        "site": pa.array(np.where(pump % 3 == 0, "plant-b", "plant-a").astype(object), pa.string()),
        "technician": pa.array(TECHNICIANS[(pump + hour) % 4], pa.string()),
    }
    for name in SENSORS:
        columns[name] = pa.array(rng.standard_normal(pumps * readings, dtype=np.float32))
    pq.write_table(pa.table(columns), path, compression="snappy")
    return pumps * readings


def write_repo(repo):
    """feature_store.yaml as the `local` template writes it, the offline store made explicit."""
    os.makedirs(os.path.join(repo, "data"), exist_ok=True)
    with open(os.path.join(repo, "feature_store.yaml"), "w") as f:
        f.write(
            "project: pump_bench\n"
            "registry: data/registry.db\n"
            "provider: local\n"
            "online_store:\n"
            "    type: sqlite\n"
            "    path: data/online_store.db\n"
            "offline_store:\n"
            "    type: file\n"
            "entity_key_serialization_version: 3\n"
        )


def view(name, pump, path):
    return FeatureView(
        name=name,
        entities=[pump],
        ttl=timedelta(days=3650),
        schema=[Field(name="site", dtype=String), Field(name="technician", dtype=String)]
        + [Field(name=s, dtype=Float32) for s in SENSORS],
        online=True,
        source=FileSource(name=f"{name}_source", path=path, timestamp_field="event_time"),
    )


def percentiles(ns):
    s = np.sort(np.asarray(ns, dtype=np.int64))
    at = lambda q: float(s[int(q * (s.size - 1))]) / 1e3
    return at(0.50), at(0.99), at(0.999)


def lookups(store, refs, entities, calls, warmup, rng, to_dict):
    """One random entity per call, timed by the caller, like our in-process lookup."""
    ids = rng.integers(0, entities, size=calls + warmup)
    latencies = []
    missing = 0
    for k, i in enumerate(ids):
        row = [{"pump_id": f"pump-{i:06}"}]
        t0 = time.perf_counter_ns()
        response = store.get_online_features(features=refs, entity_rows=row)
        if to_dict:
            out = response.to_dict()
        t1 = time.perf_counter_ns()
        if k >= warmup:
            latencies.append(t1 - t0)
            if to_dict and out["temperature_c"][0] is None:
                missing += 1
    return latencies, missing


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000, help="pumps materialized")
    parser.add_argument("--pumps", type=int, default=100_000, help="pumps in the history")
    parser.add_argument("--readings", type=int, default=10, help="hourly readings per pump")
    parser.add_argument("--labels", type=int, default=100_000, help="point-in-time labels")
    parser.add_argument("--lookups", type=int, default=2_000, help="timed online lookups")
    parser.add_argument("--warmup", type=int, default=100, help="untimed lookups first")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--keep", help="build the repo in this directory and keep it")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    repo = args.keep or tempfile.mkdtemp(prefix="feast-anchor-")
    write_repo(repo)
    snapshot_path = os.path.join(repo, "data", "snapshot.parquet")
    history_path = os.path.join(repo, "data", "history.parquet")
    table = []
    wall = time.perf_counter()
    try:
        log(f"repo: {repo}")
        log(f"writing {args.entities} x 1 and {args.pumps} x {args.readings} readings")
        write_readings(snapshot_path, args.entities, 1, rng)
        rows = write_readings(history_path, args.pumps, args.readings, rng)

        store = FeatureStore(repo_path=repo)
        pump = Entity(name="pump", join_keys=["pump_id"], value_type=ValueType.STRING)
        snapshot = view("pump_snapshot", pump, snapshot_path)
        history = view("pump_history", pump, history_path)
        store.apply([pump, snapshot, history])

        # 1. Materialization: every entity's latest reading into SQLite.
        log(f"materializing {args.entities} entities")
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # Feast prints its progress to stdout
            store.materialize(START - HOUR, START + HOUR, feature_views=["pump_snapshot"])
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
        db = os.path.join(repo, "data", "online_store.db")
        size = sum(
            os.path.getsize(db + ext) for ext in ("", "-wal") if os.path.exists(db + ext)
        )
        table.append(
            f"| materialize (file → SQLite): {args.entities} entities, 10 features "
            f"| {seconds:.2f} s | {args.entities / seconds:.0f} entities/s "
            f"| online store {size / MIB:.1f} MiB on disk; process peak RSS {peak:.0f} MiB |"
        )
        log(table[-1])

        # 2. Online lookups: one random entity per call, in process.
        refs = [f"pump_snapshot:{f}" for f in FEATURES]
        for to_dict in (False, True):
            what = "get_online_features(...).to_dict()" if to_dict else "get_online_features"
            log(f"{args.lookups} lookups: {what}")
            lat, missing = lookups(
                store, refs, args.entities, args.lookups, args.warmup, rng, to_dict
            )
            p50, p99, p999 = percentiles(lat)
            note = f"p99 {p99:.0f} µs, p99.9 {p999:.0f} µs; {len(lat)} calls"
            if to_dict:
                note += f", {missing} missing"
            table.append(
                f"| online lookup, 1 entity × 10 features: `{what}` "
                f"| p50 {p50:.0f} µs | {1e9 * len(lat) / sum(lat):.0f} lookups/s | {note} |"
            )
            log(table[-1])

        # 3. Point-in-time export: random pumps at random times within the readings' hours.
        labels = pd.DataFrame(
            {
                "pump_id": pump_ids(args.pumps)[rng.integers(0, args.pumps, size=args.labels)],
                "event_timestamp": pd.to_datetime(
                    int(START.timestamp() * 1e6)
                    + (rng.random(args.labels) * args.readings * 3.6e9).astype(np.int64),
                    unit="us",
                    utc=True,
                ),
                "failed": np.arange(args.labels) % 2,
            }
        )
        refs = [f"pump_history:{f}" for f in FEATURES]
        log(f"point-in-time join: {args.labels} labels against {rows} rows")
        started = time.perf_counter()
        out = store.get_historical_features(entity_df=labels, features=refs).to_df()
        seconds = time.perf_counter() - started
        matched = int(out["temperature_c"].notna().sum())
        table.append(
            f"| point-in-time export to a DataFrame: {len(out)} labels against {rows} rows "
            f"| {seconds:.2f} s | {len(out) / seconds:.0f} labels/s | {matched} matched |"
        )
        log(table[-1])
    finally:
        if not args.keep:
            shutil.rmtree(repo, ignore_errors=True)
    log(f"total wall time {time.perf_counter() - wall:.1f} s")

    print("| what | time | rate | notes |")
    print("|---|---:|---:|---|")
    for line in table:
        print(line)
    print()
    print(f"Feast {feast.__version__}, Python {platform.python_version()}, "
          f"pandas {pd.__version__}, pyarrow {pa.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
