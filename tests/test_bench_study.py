"""bench/study.py smoke run: tiny sizes, JSON shape, and exact pooling single file vs split files.

Timings are printed, never asserted; what is asserted is exactness: the GLM fitted over 3 node
files equals the GLM on the one file holding the same persons, and the counts agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "study.py"
pytestmark = pytest.mark.slow  # builds 3 + 2 sets of CDM files and runs the study on each
PHASES = ("cohorts", "cohorts_slowest_node", "characterization", "glm")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("bench_study")
    command = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--persons",
        "5000",
        "--nodes",
        "3",
        "--repeat",
        "2",
    ]
    done = subprocess.run(
        [*command, "--workdir", str(workdir)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_report_has_every_phase_for_single_and_split(report: dict) -> None:
    assert report["persons"] == 5000 and report["nodes"] == 3 and report["repeat"] == 2
    assert report["cdm_rows"]["person"] == 5000
    assert set(report["build_seconds"]) == {"reused", "vocabulary", "single", "split"}
    for layout in ("single", "split"):
        for phase in PHASES:
            assert phase in report[layout]
        assert {"local", "combine", "total"} <= set(report[layout]["characterization"])
        assert report[layout]["glm"]["rounds"] >= 3
        assert report[layout]["glm"]["seconds_per_round"] > 0
        assert set(report[layout]["cpu_seconds"]) == {
            "cohorts",
            "characterization",
            "glm",
            "cohorts_plus_characterization",
        }
    assert set(report["ratio_split_over_single"]) == {
        "cohorts",
        "characterization",
        "cohorts_plus_characterization",
        "glm",
    }
    assert isinstance(report["target_cohorts_plus_characterization_under_2s"], bool)


def test_same_persons_give_the_same_cohorts_and_counts(report: dict) -> None:
    rows = report["cohort_rows"]
    assert rows["observed"] == 5000
    assert 0 < rows["gi_bleed"] < rows["nsaid_users"] < rows["observed"]
    assert report["cohort_rows_equal"] is True
    assert report["characterization_counts_equal"] is True


def test_glm_over_split_files_equals_single_file(report: dict) -> None:
    single = report["glm_coefficients"]["single"]
    split = report["glm_coefficients"]["split"]
    assert list(single) == ["(Intercept)", "age", "sex_male", "cohort_nsaid_users"]
    for term, beta in single.items():
        assert split[term] == pytest.approx(beta, abs=1e-8)
    # the planted effects show: risk rises with age, male sex and NSAID use
    assert single["age"] > 0 and single["sex_male"] > 0 and single["cohort_nsaid_users"] > 0


def test_workdir_is_reused(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--persons", "300", "--nodes", "2", "--repeat", "1"]
    command += ["--workdir", str(tmp_path)]
    first = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    again = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    assert first["build_seconds"]["reused"] is False
    assert again["build_seconds"] == {"reused": True}
    assert again["glm_coefficients"] == first["glm_coefficients"]
