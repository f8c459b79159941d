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
#: Modules only the commands that compute may load; ``study validate`` must load none.
COMPUTE = ("polars", "duckdb", "numpy", "scipy", "opendp", "flwr", "torch", "sklearn",
           "matplotlib", "pandas", "pyarrow", "opacus")  # fmt: skip


def _wall(command: list[str], repeat: int, cwd: Path = REPO) -> float:
    """Median wall seconds of ``command`` (output discarded; a failure stops the benchmark)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=cwd)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def _importtime(
    args: list[str], python: str = sys.executable, cwd: Path = REPO
) -> list[tuple[str, float, int]]:
    """(module, cumulative seconds, nesting depth) of every import ``python -X importtime ARGS``
    makes. Modules imported through ``importlib.import_module`` (the registry's lazy imports)
    are not reported by CPython, only the imports they make."""
    done = subprocess.run(
        [python, "-X", "importtime", *args], capture_output=True, text=True, cwd=cwd
    )
    rows = []
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            rows.append((name.strip(), int(parts[1]) / 1e6, depth))
    return rows


def _loaded(statement: str, names: tuple[str, ...], python: str, cwd: Path) -> list[str]:
    """The ``names`` that ``statement`` puts into ``sys.modules``."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd)
    return out.stdout.split()


def _validate_figures(checkout: Path, python: str, repeat: int) -> dict[str, object]:
    """``study validate`` in one checkout: wall median, import figures, what it loads."""
    study = checkout / STUDY.relative_to(REPO)
    validate = _importtime(["-m", "fedomop.cli", "study", "validate", str(study)], python, checkout)
    split = (checkout / "studies" / "loading.py").exists()
    loading = "studies.loading" if split else "studies.model"
    # what validation imports to know the kinds: the specs module, or (before) every kind
    schema = f"import {loading}, " + ("studies.analyses.specs" if split else "studies.analyses")
    needed = [
        sum(s for _, s, depth in _importtime(["-c", schema], python, checkout) if depth == 0)
        for _ in range(repeat)
    ]
    statement = f"from {loading} import load_study\nload_study({str(study)!r})"
    return {
        "study_validate_wall_s": _wall(
            [python, "-m", "fedomop.cli", "study", "validate", str(study)], repeat, checkout
        ),
        "import_of_study_schema_and_specs_s": {
            "statement": schema,
            "median_s": round(statistics.median(needed), 3),
        },
        "compute_modules_loaded_by_study_validate": _loaded(statement, COMPUTE, python, checkout),
        "slowest_imports_of_study_validate_s": {
            name: round(s, 3) for name, s, _ in sorted(validate, key=lambda r: -r[1])[:10]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout with its own .venv (e.g. /work/main): measured side by side",
    )
    args = parser.parse_args()
    fedomop = [sys.executable, "-m", "fedomop.cli"]
    cli_import = sum(
        s for name, s, _ in _importtime(["-c", "import fedomop.cli"]) if name == "fedomop.cli"
    )
    bare = _wall([sys.executable, "-c", "pass"], args.repeat)
    help_s = _wall([*fedomop, "--help"], args.repeat)
    this = _validate_figures(REPO, sys.executable, args.repeat)
    validate_s = float(this["study_validate_wall_s"])  # type: ignore[arg-type]
    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeat": args.repeat,
        "import_fedomop_cli_s": round(cli_import, 3),
        "wall_s": {"python_bare": bare, "help": help_s, "study_validate": validate_s},
        "ratio_to_bare_python": {
            "help": round(help_s / bare, 1),
            "study_validate": round(validate_s / bare, 1),
        },
        "heavy_modules_loaded_by_import_fedomop_cli": _loaded(
            "import fedomop.cli", HEAVY, sys.executable, REPO
        ),
        "this_checkout": this,
    }
    if args.against is not None:
        other = _validate_figures(
            args.against, str(args.against / ".venv" / "bin" / "python"), args.repeat
        )
        report["against"] = {"checkout": str(args.against), **other}
        report["study_validate_ratio_against_to_this"] = round(
            float(other["study_validate_wall_s"]) / validate_s,
            2,  # type: ignore[arg-type]
        )
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
