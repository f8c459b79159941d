"""Operator commands: ``fedomop node check-policy | budget | pooling-key | audit verify``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedomop.ui import fail, say_error
from node.audit import AuditLog
from node.policy import Policy, PolicyError, check_policy, load_policy
from privacy.accounting import rho_to_epsilon
from privacy.ledger import Ledger

console = Console()
PolicyFile = typer.Option(..., "--policy", help="The node's policy TOML (see examples/node.toml).")


def _policy(path: Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as err:
        fail(str(err))


def check_policy_command(policy_file: Path = PolicyFile) -> None:
    """Validate a node policy and the files it names.

    Example: fedomop node check-policy --policy node.toml
    """
    policy = _policy(policy_file)
    problems = check_policy(policy)
    for problem in problems:
        say_error(f"{policy_file}: {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(
        f"[green]policy ok[/green] node {policy.node_name}: CDM {policy.cdm_path}, "
        f"{len(policy.keys)} trusted permit-body key(s), min cell count {policy.min_cell_count}, "
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
    """Print this node's pooling identity key; give it to the permit body (its --node-key).

    Derived from the secure-aggregation secret beside the ledger (created if absent), the one
    the gate signs its pooled-mode keys with, so it stays the same across runs.

    Example: fedomop node pooling-key --policy node.toml
    """
    from privacy.secagg import SecAggError, identity_public_hex, node_secret

    policy = _policy(policy_file)
    try:
        secret = node_secret(policy.ledger_path.with_suffix(".secagg.key"))
    except (OSError, SecAggError) as err:
        fail(str(err))
    console.print(identity_public_hex(secret), soft_wrap=True)


def audit_verify(
    policy_file: Path = PolicyFile,
) -> None:
    """Check the audit log's hash chain: any changed, removed or reordered entry is reported.

    Example: fedomop node audit verify --policy node.toml
    """
    policy = _policy(policy_file)
    log = AuditLog(policy.audit_path)
    problems = log.verify()
    for problem in problems:
        say_error(f"audit line {problem.line}: {problem.problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]audit log intact[/green]: {len(log.entries())} entries in {log.path}")


def register(app: typer.Typer) -> None:
    """Attach policy, budget and audit commands to the ``node`` group."""
    app.command("check-policy")(check_policy_command)
    app.command("budget")(budget)
    app.command("pooling-key")(pooling_key)
    audit_app = typer.Typer(help="The node's hash-chained audit log.", no_args_is_help=True)
    audit_app.command("verify")(audit_verify)
    app.add_typer(audit_app, name="audit")
