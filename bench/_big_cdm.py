"""A large CDM for the reliability bench's 1M-person node, built once into a cache.

The project's generator (``omop_etl.synth.generate``) simulates every patient of a node at once,
so its memory grows with the node: 583 MB peak RSS at 20k patients, which would be about 29 GB
at 1M. Here it runs in chunks of ``CHUNK`` patients, each with its own seed (seed * 1000 + i),
and each chunk's Synthea files are appended to one export (patients and encounters carry UUIDs,
so chunks never collide), except ``observations.csv``, which keeps its header only: the demo
study reads no measurement or observation, and that file is 40 % of the export (8.5 GB of
21 GB at 1M patients; the disk is shared). The Synthea loader (``omop_etl.synthea.load_synthea``, DuckDB memory
capped) then builds one CDM file from it, and the CSVs are deleted. The file is kept under the
cache folder (default ``test-artifacts/bench-cache``, git-ignored) and reused by name while
``DATA_VERSION`` is unchanged; the test suite never builds it.

    .venv/bin/python bench/_big_cdm.py --persons 1000000   # build (or find) the cached CDM
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Synthea files whose rows are left out (header kept): nothing the bench's study reads.
LEFT_OUT = ("observations",)
#: Bump when the generated data changes, so the cache rebuilds instead of reusing a stale file.
DATA_VERSION = 2
CHUNK = 50_000
PROFILE = "urban_hospital"
CACHE = REPO / "test-artifacts" / "bench-cache"


def _append(part: Path, whole: Path, *, rows: bool = True) -> None:
    """``part``'s CSV rows (unless ``rows`` is false) appended to ``whole`` (its header only
    when ``whole`` is new)."""
    with part.open("rb") as src, whole.open("ab") as dst:
        header = src.readline()
        if dst.tell() == 0:
            dst.write(header)
        if rows:
            shutil.copyfileobj(src, dst, 16 << 20)


def generate_chunked(out: Path, persons: int, seed: int) -> dict[str, float]:
    """One Synthea export of ``persons`` patients written chunk by chunk into ``out``."""
    from omop_etl.synth import FILES, generate

    tic = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    part = out / "_part"
    for i, first in enumerate(range(0, persons, CHUNK)):
        size = min(CHUNK, persons - first)
        generate(part, patients=size, seed=seed * 1000 + i, profile=PROFILE)
        for name in FILES:
            _append(part / f"{name}.csv", out / f"{name}.csv", rows=name not in LEFT_OUT)
        shutil.rmtree(part)
    return {"generate_s": round(time.perf_counter() - tic, 1)}


def big_cdm(persons: int, seed: int = 1, cache: Path = CACHE) -> tuple[Path, dict]:
    """The cached CDM of ``persons`` generated patients, built now if missing; with how long
    building it took (read back from its note when it was cached before)."""
    db = cache / f"synth-{PROFILE}-{persons}-s{seed}-v{DATA_VERSION}.duckdb"
    note = db.with_suffix(".json")
    if db.exists() and note.exists():
        return db, json.loads(note.read_text()) | {"cached": True}
    from omop_etl.synthea import load_synthea

    src = cache / f"_src-{persons}-s{seed}"
    shutil.rmtree(src, ignore_errors=True)
    try:
        built = generate_chunked(src, persons, seed)
        built["source_gb"] = round(sum(f.stat().st_size for f in src.glob("*.csv")) / 1e9, 2)
        tic = time.perf_counter()
        report = load_synthea(src, db, progress=False, memory_limit="2GB")
        built["load_s"] = round(time.perf_counter() - tic, 1)
        built["rows_loaded"] = report.totals.loaded
    finally:
        shutil.rmtree(src, ignore_errors=True)
    built["cdm_gb"] = round(db.stat().st_size / 1e9, 2)
    note.write_text(json.dumps(built))
    return db, built | {"cached": False}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    path, info = big_cdm(args.persons, args.seed)
    print(json.dumps({"cdm": str(path), **info}))
