"""Benchmark the node ETL: generate N synthetic patients, load them into a CDM; print JSON.

Each stage runs in its own child process so that its peak RSS (``ru_maxrss``) is its own:
``generate`` (Synthea-format CSVs) and ``load`` (vocabulary, load + mapping, indexes).
Target on 2 cores: >= 1M source rows/s through load and mapping, peak RSS < 2 GB.

The machine may be shared, so every stage reports CPU seconds (user + system, all of DuckDB's
threads) next to wall seconds, and rows/s both per wall second and per CPU second; the ratio
CPU / wall shows how much of the cores the load actually got.

    .venv/bin/python bench/etl.py --patients 100000
    .venv/bin/python bench/etl.py --source postgres      # GiBleed from CSV vs from PostgreSQL
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stage_generate(args: argparse.Namespace) -> dict:
    from omop_etl.synth import generate

    started, cpu = time.perf_counter(), _cpu_seconds()
    generate(args.dir, patients=args.patients, seed=args.seed, profile=args.profile)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds() - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _stage_load(args: argparse.Namespace) -> dict:
    from omop_etl.synthea import load_synthea

    timings: dict[str, float] = {}
    started, cpu = time.perf_counter(), _cpu_seconds()
    report = load_synthea(
        args.dir, args.db, progress=False, memory_limit=args.memory_limit, timings=timings
    )
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds() - cpu,
        "stages": timings,
        "rows_loaded": report.totals.loaded,
        "rows_quarantined": report.totals.quarantined,
        "rows_unmapped": report.totals.unmapped,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _child(stage: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--stage", stage, "--dir", str(args.dir)]
    command += ["--db", str(args.db), "--patients", str(args.patients), "--seed", str(args.seed)]
    command += ["--profile", args.profile, "--memory-limit", args.memory_limit]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", default="urban_hospital")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit for the load")
    parser.add_argument(
        "--source",
        choices=("synthea", "postgres"),
        default="synthea",
        help="synthea: generate and load a Synthea export; postgres: an OMOP CSV folder loaded "
        "from CSV and from PostgreSQL, side by side (bench/etl_postgres.py)",
    )
    parser.add_argument(
        "--csv-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/eunomia/GiBleed/csv",
        help="OMOP CSV folder for --source postgres (default: GiBleed)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per route (--source postgres)")
    parser.add_argument("--stage", choices=("generate", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.source == "postgres":
        from etl_postgres import main as postgres_main

        postgres_main(args.csv_dir, args.repeat)
        return
    if args.stage:
        stage = _stage_generate if args.stage == "generate" else _stage_load
        print(json.dumps(stage(args)))
        return

    from omop_etl.synthea import source_rows

    with tempfile.TemporaryDirectory(prefix="fedomop-bench-") as tmp:
        args.dir, args.db = Path(tmp) / "synthea", Path(tmp) / "cdm.duckdb"
        generated = _child("generate", args)
        rows = source_rows(args.dir)
        csv_mb = sum(p.stat().st_size for p in args.dir.iterdir()) / 1e6
        loaded = _child("load", args)
        db_mb = args.db.stat().st_size / 1e6
    total = sum(rows.values())
    stages = loaded["stages"]
    wall = {"generate": generated["seconds"], "load_total": loaded["seconds"]}
    cpu = {"generate": generated["cpu_seconds"], "load_total": loaded["cpu_seconds"]}
    for name in ("vocabulary", "load_map", "index"):
        wall[name], cpu[name] = stages[name], stages[f"cpu_{name}"]
    # files and parts load side by side: per file only the wall seconds of its statements
    # (summed over its parts, overlapping other files'); CPU is only known per stage
    per_file = {
        name.split("/", 1)[1]: round(stages[name], 2)
        for name in stages
        if name.startswith("load_map/")
    }
    print(
        json.dumps(
            {
                "patients": args.patients,
                "profile": args.profile,
                "cpus": len(os.sched_getaffinity(0)),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "source_rows": total,
                "source_rows_per_file": rows,
                "source_csv_mb": round(csv_mb, 1),
                "cdm_duckdb_mb": round(db_mb, 1),
                "wall_seconds": {k: round(v, 2) for k, v in wall.items()},
                "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                "load_map_wall_seconds_per_file": per_file,
                "source_rows_per_s": {
                    "load_map_wall": round(total / wall["load_map"]),
                    "load_map_cpu": round(total / cpu["load_map"]),
                    "load_total_wall": round(total / wall["load_total"]),
                    "load_total_cpu": round(total / cpu["load_total"]),
                },
                "rows_loaded": loaded["rows_loaded"],
                "rows_quarantined": loaded["rows_quarantined"],
                "rows_unmapped": loaded["rows_unmapped"],
                "peak_rss_mb": {
                    "generate": round(generated["peak_rss_mb"]),
                    "load": round(loaded["peak_rss_mb"]),
                },
                "duckdb_memory_limit": args.memory_limit,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
