"""Benchmark the start-up of the ``fedomop`` command; print JSON.

Every call of ``fedomop`` pays for importing ``fedomop.cli`` before it does anything, so the
command groups are registered without importing what their commands run (DuckDB, polars,
OpenDP, Flower, torch): each command imports its machinery itself. This measures

- ``import_fedomop_cli_s``: ``import fedomop.cli`` (cumulative, from ``python -X importtime``);
- wall seconds (median of ``--repeat`` runs) of ``python -c pass`` (the interpreter alone),
  ``fedomop --help`` and ``fedomop study validate`` on an example study, each also as a ratio
  to the bare interpreter;
- the heavy modules ``import fedomop.cli`` loads (should be none) and the ten slowest imports
  of ``study validate``.

    .venv/bin/python bench/startup.py --repeat 5

Measured (2-core machine shared by ~8 engineers, load > 4, so absolute seconds are high; the
import figures are ``python -X importtime`` cumulative): ``import studies.analyses`` (what
``study validate`` needs to know every kind's Spec) 1.37 s before issue 16's split, 0.41-0.48 s
after (scipy, OpenDP and Flower no longer load: imported inside the functions that compute);
``fedomop study validate examples/gibleed_glm/study.yaml`` wall 1.8-2.3 s before, 1.3-1.7 s
after on the same loaded machine; run back to back at 00:47 under the same load: main
3.27 s, this branch 1.68 s (``import studies.analyses`` 1.69 s vs 0.38 s). Still loaded: polars, duckdb and numpy, which the analysis
modules import at the top beside their specs (the next step: spec classes in modules of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "examples" / "gibleed_glm" / "study.yaml"
#: Modules a command may need but ``fedomop --help`` must not load.
HEAVY = ("torch", "opendp", "flwr", "sklearn", "duckdb", "polars", "numpy", "scipy", "pandas",
         "circe", "matplotlib", "pyarrow", "opacus", "pydantic", "cryptography")  # fmt: skip


def _wall(command: list[str], repeat: int) -> float:
    """Median wall seconds of ``command`` (output discarded; a failure stops the benchmark)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def _importtime(args: list[str]) -> list[tuple[str, float]]:
    """(module, cumulative seconds) of every import ``python -X importtime ARGS`` makes."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO
    )
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((parts[2].strip(), int(parts[1]) / 1e6))
    return rows


def _heavy_loaded(statement: str = "import fedomop.cli") -> list[str]:
    """The ``HEAVY`` modules that ``statement`` puts into ``sys.modules``."""
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fedomop = [sys.executable, "-m", "fedomop.cli"]
    cli_import = dict(_importtime(["-c", "import fedomop.cli"])).get("fedomop.cli", 0.0)
    validate = _importtime(["-m", "fedomop.cli", "study", "validate", str(STUDY)])
    bare = _wall([sys.executable, "-c", "pass"], args.repeat)
    help_s = _wall([*fedomop, "--help"], args.repeat)
    validate_s = _wall([*fedomop, "study", "validate", str(STUDY)], args.repeat)
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "repeat": args.repeat,
                "import_fedomop_cli_s": round(cli_import, 3),
                "wall_s": {"python_bare": bare, "help": help_s, "study_validate": validate_s},
                "ratio_to_bare_python": {
                    "help": round(help_s / bare, 1),
                    "study_validate": round(validate_s / bare, 1),
                },
                "heavy_modules_loaded_by_import_fedomop_cli": _heavy_loaded(),
                "heavy_modules_loaded_by_study_validate": _heavy_loaded(
                    f"from studies.model import load_study; load_study({str(STUDY)!r})"
                ),
                "slowest_imports_of_study_validate_s": {
                    name: round(s, 3) for name, s in sorted(validate, key=lambda r: -r[1])[:10]
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
