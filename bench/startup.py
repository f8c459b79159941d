"""Benchmark the start-up of the ``fedomop`` command; print JSON.

Every call of ``fedomop`` pays for importing ``fedomop.cli`` before it does anything, so the
command groups are registered without importing what their commands run (DuckDB, polars,
OpenDP, Flower, torch): each command imports its machinery itself. This measures

- ``import_fedomop_cli_s``: ``import fedomop.cli`` (cumulative, from ``python -X importtime``);
- wall and CPU seconds (medians of ``--repeat`` interleaved runs) of ``python -c pass`` (the
  interpreter alone), ``fedomop --help`` and ``fedomop study validate`` on an example study,
  each also as a ratio to the bare interpreter; with ``--against CHECKOUT`` (its own
  ``.venv``) the same ``study validate`` there, side by side, and the ratio;
- per checkout: the median import time of what validation needs (the schema and every kind's
  Spec), the compute modules ``study validate`` loads (should be none) and its ten slowest
  imports.

    .venv/bin/python bench/startup.py --repeat 5 --against /work/main

Measured on the shared 2-core machine, load average 7-8 (so wall seconds are high and swing;
CPU seconds are what a run costs without waiting for a core, close to an idle machine's wall
time), this branch against main at ec6777f, ``--repeat 5``, two runs at 01:05:
``study validate`` wall 0.54 / 0.63 s here against 1.42 / 1.16 s on main (ratio 2.6 / 1.8);
CPU 0.26 s here against 0.55 s on main (ratio 2.1), ``fedomop --help`` 0.19 s CPU, so the
validation itself (pydantic, yaml, the schema and the specs) adds 0.07 s. The import of the
schema and specs: 0.20-0.31 s here (``studies.loading`` + ``studies.analyses.specs``, pydantic
only) against 0.65-1.17 s for ``studies.model`` + ``studies.analyses`` on main, which load
polars, DuckDB and numpy. Before issue 16's split (scipy, OpenDP and Flower also loaded)
``import studies.analyses`` took 1.37 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _walls(
    commands: dict[str, tuple[list[str], Path]], repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median CPU seconds (user + system) of each command (output
    discarded; a failure stops the benchmark), run in turn ``repeat`` times: interleaved, so a
    change in the machine's load falls on all of them alike and their ratios stay fair. CPU
    time is what the command costs without waiting for a core: near its wall time on an idle
    machine, and far less swayed by the other users of a shared one."""
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, (command, cwd) in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=cwd)
            wall[name].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return _medians(wall), _medians(cpu)


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(values), 3) for name, values in samples.items()}


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


def _validate_command(checkout: Path, python: str) -> tuple[list[str], Path]:
    study = checkout / STUDY.relative_to(REPO)
    return [python, "-m", "fedomop.cli", "study", "validate", str(study)], checkout


def _validate_figures(checkout: Path, python: str, repeat: int) -> dict[str, object]:
    """``study validate`` in one checkout: import figures and what it loads."""
    study = checkout / STUDY.relative_to(REPO)
    validate = _importtime(_validate_command(checkout, python)[0][1:], python, checkout)
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
    python = sys.executable
    cli_import = sum(
        s for name, s, _ in _importtime(["-c", "import fedomop.cli"]) if name == "fedomop.cli"
    )
    commands = {
        "python_bare": ([python, "-c", "pass"], REPO),
        "help": ([python, "-m", "fedomop.cli", "--help"], REPO),
        "study_validate": _validate_command(REPO, python),
    }
    other_python = str(args.against / ".venv" / "bin" / "python") if args.against else ""
    if args.against is not None:
        commands["study_validate_against"] = _validate_command(args.against, other_python)
    load_before = round(os.getloadavg()[0], 2)
    wall, cpu = _walls(commands, args.repeat)
    report: dict[str, object] = {
        "cpus": os.cpu_count(),
        "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],
        "repeat": args.repeat,
        "import_fedomop_cli_s": round(cli_import, 3),
        "wall_s": wall,
        "cpu_s": cpu,
        "ratio_to_bare_python": {
            name: round(s / wall["python_bare"], 1)
            for name, s in wall.items()
            if name != "python_bare"
        },
        "heavy_modules_loaded_by_import_fedomop_cli": _loaded(
            "import fedomop.cli", HEAVY, python, REPO
        ),
        "this_checkout": _validate_figures(REPO, python, args.repeat),
    }
    if args.against is not None:
        report["against"] = {
            "checkout": str(args.against),
            **_validate_figures(args.against, other_python, args.repeat),
        }
        report["study_validate_ratio_against_to_this"] = {
            "wall": round(wall["study_validate_against"] / wall["study_validate"], 2),
            "cpu": round(cpu["study_validate_against"] / cpu["study_validate"], 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
