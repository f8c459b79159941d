"""Start-up: ``import fedomop.cli`` registers every command without loading what they run.

Every ``fedomop`` call, ``--help`` included, pays for this import (it took 2.4 s when the
command modules imported DuckDB, OpenDP and the analyses at the top); ``bench/startup.py``
measures the time, this test only checks which modules the import loads.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from fedomop.cli import app
from tests.conftest import REPO

HEAVY = ("torch", "opendp", "flwr", "sklearn", "duckdb", "polars", "numpy", "scipy", "pandas",
         "circe", "matplotlib", "pyarrow", "opacus", "pydantic", "cryptography", "yaml")  # fmt: skip


def _modules_after(code: str) -> set[str]:
    """Top-level modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
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


#: What validating a study must never load: the data, DP, federation, learning and statistics
#: libraries belong to the commands that compute. Each kind's Spec lives in
#: ``studies.analyses.specs`` (pydantic only); the registry imports a kind's analysis module,
#: which loads polars, DuckDB and numpy, only when the kind runs.
NOT_FOR_VALIDATE = ("polars", "duckdb", "numpy", "scipy", "opendp", "flwr", "torch", "sklearn",
                    "matplotlib", "opacus", "pandas", "pyarrow")  # fmt: skip


@pytest.mark.parametrize("example", ["gibleed_glm", "gibleed_circe"])
def test_study_validate_loads_no_compute_library(example: str) -> None:
    """A study validates without the compute libraries; a Circe cohort's check loads circepy
    (the check parses the expression), nothing more."""
    study = REPO / "examples" / example / "study.yaml"
    code = (
        "from typer.testing import CliRunner; from fedomop.cli import app; "
        f"r = CliRunner().invoke(app, ['study', 'validate', {str(study)!r}]); "
        "assert r.exit_code == 0, r.output"
    )
    loaded = _modules_after(code)
    assert "pydantic" in loaded  # the probe sees the validation ran
    assert sorted(loaded & set(NOT_FOR_VALIDATE)) == []


def test_validating_every_kind_loads_no_compute_library(tmp_path) -> None:
    """Every shipped kind's Spec, and a study with a mistyped analysis field (the path that
    suggests the nearest field), resolve without importing an analysis module."""
    raw = yaml.safe_load((REPO / "examples" / "gibleed_glm" / "study.yaml").read_text())
    raw["analyses"][0]["famly"] = raw["analyses"][0].pop("family")
    mistyped = tmp_path / "study.yaml"
    mistyped.write_text(yaml.safe_dump(raw))
    code = textwrap.dedent(f"""
        from studies.loading import load_study
        from studies.model import StudyError
        from studies.registry import REGISTRY, SHIPPED
        specs = [REGISTRY.spec(kind) for kind in SHIPPED]
        try:
            load_study({str(mistyped)!r})
        except StudyError as exc:
            assert "did you mean 'family'" in str(exc), exc
        else:
            raise AssertionError("a mistyped field was accepted")
        """)
    loaded = _modules_after(code)
    assert {"pydantic", "yaml"} <= loaded
    assert sorted(loaded & set(NOT_FOR_VALIDATE)) == []
