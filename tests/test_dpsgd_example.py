"""The shipped DP-training example selects persons on generated nodes.

It enters persons at their first celecoxib or diclofenac era. A generated node derives drug eras
from drug exposures through ``concept_ancestor``; the shipped vocabulary (from GiBleed's subset)
lacked the ingredient ancestors of the two drugs the generator prescribes, so every generated
node had no such era and the example selected 0 persons (``omop_etl.vocab.ADDED_ANCESTORS``).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from studies.analyses.dpsgd import _rows
from studies.loading import load_study
from studies.runner import prepare_cdm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gibleed_dp_training" / "study.yaml"


def test_example_selects_persons_and_events_on_generated_nodes(synthetic_node_dbs) -> None:
    study = load_study(EXAMPLE)
    spec = study.analysis("bleed_model")
    for path in synthetic_node_dbs:
        with duckdb.connect(str(path), read_only=True) as con:
            eras = dict(
                con.execute(
                    "SELECT drug_concept_id, count(*) FROM drug_era "
                    "WHERE drug_concept_id IN (1118084, 1124300) GROUP BY 1"
                ).fetchall()
            )
            assert set(eras) == {1118084, 1124300} and min(eras.values()) > 20, (path, eras)
            _, x, y = _rows(prepare_cdm(con, study, path.stem), spec)
        assert len(y) > 100, (path.stem, len(y))  # was 0 on every generated node
        assert x.shape[1] == len(spec.terms)
        assert 0 < y.sum() < len(y), (path.stem, y.sum())
