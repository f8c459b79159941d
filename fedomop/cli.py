"""The ``fedomop`` console command: one subcommand group per role, each defined in its room."""

from __future__ import annotations

import typer

from coordinator.cli import register as register_coordinator
from node.cli import register as register_node
from node.membership_cli import register as register_audit
from omop_etl.cli import register as register_etl
from studies.cli import register as register_studies

app = typer.Typer(
    name="fedomop",
    help="Federated OMOP CDM toolkit: ETL, data quality, studies, permits, nodes, coordinator.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for register in (
    register_etl,
    register_studies,
    register_node,
    register_coordinator,
    register_audit,
):
    register(app)

if __name__ == "__main__":
    app()
