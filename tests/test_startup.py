"""Start-up: ``import fedomop.cli`` registers every command without loading what they run.

Every ``fedomop`` call, ``--help`` included, pays for this import (it took 2.4 s when the
command modules imported DuckDB, OpenDP and the analyses at the top); ``bench/startup.py``
measures the time, this test only checks which modules the import loads.
"""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from fedomop.cli import app
from tests.conftest import REPO

HEAVY = ("torch", "opendp", "flwr", "sklearn", "duckdb", "polars", "numpy", "scipy", "pandas",
         "circe", "matplotlib", "pyarrow", "opacus", "pydantic", "cryptography", "yaml")  # fmt: skip


def _modules_after(code: str) -> set[str]:
    """Top-level modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}; import sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return {name.split(".")[0] for name in done.stdout.split()}


def test_importing_the_cli_loads_no_heavy_module() -> None:
    loaded = _modules_after("import fedomop.cli")
    assert "typer" in loaded  # the probe sees what the import loads
    assert sorted(loaded & set(HEAVY)) == []


def test_help_lists_every_group_without_loading_them() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from fedomop.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output"
    )
    assert sorted(_modules_after(code) & set(HEAVY)) == []
    output = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    for group in ("etl", "dq", "study", "permit", "node", "coordinator", "run", "demo"):
        assert group in output


#: What validating a study must never load: the DP, federation, learning and statistics
#: libraries belong to the commands that compute (polars, duckdb and numpy still load, with the
#: analysis modules that hold the specs).
NOT_FOR_VALIDATE = ("torch", "opendp", "flwr", "sklearn", "scipy", "opacus", "matplotlib")


def test_study_validate_loads_no_compute_library() -> None:
    study = REPO / "examples" / "gibleed_glm" / "study.yaml"
    code = (
        "from typer.testing import CliRunner; from fedomop.cli import app; "
        f"r = CliRunner().invoke(app, ['study', 'validate', {str(study)!r}]); "
        "assert r.exit_code == 0, r.output"
    )
    loaded = _modules_after(code)
    assert "pydantic" in loaded  # the probe sees the validation ran
    assert sorted(loaded & set(NOT_FOR_VALIDATE)) == []
