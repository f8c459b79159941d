"""Operator commands: ``fedomop node check-policy | budget | pooling-key | audit verify | describe``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fedomop.ui import fail, say_error

if TYPE_CHECKING:
    from node.policy import Policy

console = Console()
PolicyFile = typer.Option(..., "--policy", help="The node's policy TOML (see examples/node.toml).")


def _policy(path: Path) -> Policy:
    """The node policy at ``path``, or one error line and exit 1. The policy, ledger and audit
    modules load only here (the policy pulls in the permit code and OpenDP), so that the other
    commands start quickly."""
    from node.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as err:
        fail(str(err))


def check_policy_command(policy_file: Path = PolicyFile) -> None:
    """Validate a node policy and the files it names.

    Example: fedomop node check-policy --policy node.toml
    """
    from node.policy import check_policy

    policy = _policy(policy_file)
    problems = check_policy(policy)
    for problem in problems:
        say_error(f"{policy_file}: {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(
        f"[green]policy ok[/green] node {policy.node_name}: CDM {policy.cdm_path}, "
        f"{len(policy.keys)} trusted permit-body key(s), min cell count {policy.min_cell_count}, "
        f"time bins >= {policy.privacy.min_time_bin_days} days, "
        f"epsilon <= {policy.privacy.max_epsilon_per_permit:g}/permit and "
        f"{policy.privacy.max_epsilon_per_year:g}/year, analyses {policy.analyses.allowed}"
    )
    if not policy.trust.revocation_lists:
        console.print(
            "[yellow]warning:[/yellow] no revocation list: this node cannot honour revoked permits"
        )


def budget(policy_file: Path = PolicyFile) -> None:
    """Show privacy budget spent and left per permit on this node.

    Example: fedomop node budget --policy node.toml
    """
    from privacy.accounting import rho_to_epsilon
    from privacy.ledger import Ledger

    policy = _policy(policy_file)
    ledger = Ledger(policy.ledger_path)
    table = Table(title=f"privacy budget on node {policy.node_name} ({policy.ledger_path.name})")
    for column in (
        "permit",
        "releases",
        "epsilon spent",
        "epsilon budget",
        "rho spent",
        "rho left",
    ):
        table.add_column(column, justify="right")
    for row in ledger.summary():
        table.add_row(
            row["permit_id"],
            str(row["releases"]),
            f"{rho_to_epsilon(row['rho_spent'], row['delta']):.4g}",
            f"{rho_to_epsilon(row['rho_budget'], row['delta']):.4g}",
            f"{row['rho_spent']:.4g}",
            f"{max(row['rho_budget'] - row['rho_spent'], 0.0):.4g}",
        )
    console.print(table)
    year = ledger.spent_this_year()
    console.print(
        f"this year: rho {year:.4g} of {policy.rho_per_year():.4g} "
        f"(epsilon {rho_to_epsilon(year, policy.privacy.delta):.4g} of "
        f"{policy.privacy.max_epsilon_per_year:g} at delta {policy.privacy.delta:g})"
    )


def pooling_key(policy_file: Path = PolicyFile) -> None:
    """Print this node's identity key; give it to the permit body (its --node-key).

    Derived from the node secret beside the ledger (created if absent): the gate signs every
    release with it, so peers can verify the transcripts of multi-round analyses, and pooled
    mode's keys. It stays the same across runs.

    Example: fedomop node pooling-key --policy node.toml
    """
    from privacy.secagg import SecAggError

    policy = _policy(policy_file)
    try:
        identity = policy.identity_hex()
    except (OSError, SecAggError) as err:
        fail(str(err))
    console.print(identity, soft_wrap=True)


def audit_verify(
    policy_file: Path = PolicyFile,
) -> None:
    """Check the audit log's hash chain: any changed, removed or reordered entry is reported.

    Example: fedomop node audit verify --policy node.toml
    """
    from node.audit import AuditLog

    policy = _policy(policy_file)
    log = AuditLog(policy.audit_path)
    problems = log.verify()
    for problem in problems:
        say_error(f"audit line {problem.line}: {problem.problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]audit log intact[/green]: {len(log.entries())} entries in {log.path}")


def describe(
    policy_file: Path = typer.Option(
        ..., "--policy", help="The node's policy TOML, with a \\[catalogue] section."
    ),
    out: Path = typer.Option(..., "--out", help="folder for dataset.ttl and dataset.jsonld"),
) -> None:
    """Write the node's HealthDCAT-AP dataset description (Turtle and JSON-LD), audited as a release.

    The text comes from the policy's \\[catalogue] section; the counts, ages and years from
    the CDM, suppressed and rounded at the node's minimum cell count.

    Example: fedomop node describe --policy node.toml --out description
    """
    from node.catalogue import DescribeError
    from node.catalogue import describe as write_description

    policy = _policy(policy_file)
    if not policy.cdm_path.is_file():
        fail(f"CDM file {policy.cdm_path} does not exist")
    try:
        done = write_description(policy, out)
    except (DescribeError, OSError) as err:
        fail(str(err))
    facts = done.facts
    shown = {
        "unique individuals": facts.persons,
        "records": facts.records,
        "typical ages": _span(facts.min_age, facts.max_age),
        "years observed": _span(facts.first_year, facts.last_year),
        "coding systems": ", ".join(facts.coding_systems) or None,
    }
    for what, value in shown.items():
        console.print(f"{what}: {value if value is not None else '[yellow]withheld[/yellow]'}")
    if facts.withheld:
        console.print(f"withheld by disclosure control: {', '.join(facts.withheld)}")
    for name, path in done.files.items():
        console.print(f"wrote [bold]{path}[/bold] (sha256 {done.hashes[name][:16]}...)")
    console.print(f"audited as a release in {policy.audit_path} (entry {done.audit_hash[:16]}...)")


def _span(low: int | None, high: int | None) -> str | None:
    return None if low is None else f"{low}-{high}"


def register(app: typer.Typer) -> None:
    """Attach policy, budget, audit and describe commands to the ``node`` group."""
    app.command("check-policy")(check_policy_command)
    app.command("describe")(describe)
    app.command("budget")(budget)
    app.command("pooling-key")(pooling_key)
    audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
    audit_app.command("verify")(audit_verify)
    app.add_typer(audit_app, name="audit")
