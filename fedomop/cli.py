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
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from fedomop import __version__

        print(f"fedomop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Federated OMOP CDM toolkit: ETL, data quality, studies, permits, nodes, coordinator, audit.

    Example: fedomop study validate examples/gibleed_glm/study.yaml
    """


for register in (
    register_etl,
    register_studies,
    register_node,
    register_coordinator,
    register_audit,
):
    register(app)

if __name__ == "__main__":  # ``python -m fedomop.cli``: the same program as the ``fedomop`` script
    import runpy

    # run the entry point as a program (signal handlers first, then this app), not as an
    # import: the entry imports this module, and this one never imports the entry back
    runpy.run_module("fedomop.entry", run_name="__main__", alter_sys=True)
