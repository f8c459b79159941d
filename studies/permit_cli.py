"""Permit-body commands: ``fedomop permit keygen | review | issue | verify | revoke``."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fedomop.ui import add_commands, fail, say_error
from privacy.defaults import DEFAULT_MIN_CELL_COUNT
from studies.permit_costs import print_dp_sgd_cost, print_pooled_cost

if TYPE_CHECKING:
    from pydantic import ValidationError

    from studies.permit import PermitBody

console = Console()


# The permit machinery (cryptography, pydantic, OpenDP) is imported inside each command, so
# that ``fedomop --help`` and the other commands start without it.


def _study(path: Path):  # -> (Study, hash)
    from studies.canonical import study_hash
    from studies.loading import load_study
    from studies.model import StudyError

    try:
        study = load_study(path)
    except StudyError as err:
        fail(f"study {path} is invalid:\n{err}")
    return study, study_hash(study)


def keygen(out: Path = typer.Option(..., "--out", help="folder for the key pair")) -> None:
    """Create an Ed25519 signing key pair for a permit body.

    Example: fedomop permit keygen --out body/
    """
    from studies.permit import PermitError, generate_keypair

    try:
        private_path, public_path, kid = generate_keypair(out)
    except PermitError as err:
        fail(str(err))
    console.print(f"key id [bold]{kid}[/bold]\nprivate key {private_path} (keep it secret)")
    console.print(f"public key  {public_path} (give it to nodes: [trust] permit_body_keys)")


def _release_kind(kind: str) -> str:
    from studies.analyses import REGISTRY

    doc = (REGISTRY[kind].__doc__ or "").strip().splitlines()
    return doc[0] if doc else "aggregate statistics"


def review(
    study_path: Path = typer.Argument(..., metavar="STUDY", help="study definition (YAML or JSON)"),
    budget: float = typer.Option(1.0, help="epsilon per node to preview DP costs against"),
    delta: float = typer.Option(1e-6, help="delta of the preview"),
    min_honest: int = typer.Option(
        2, min=1, help="pooled mode: honest nodes each node's policy assumes (min_honest_nodes)"
    ),
    permit: Path | None = typer.Option(
        None, help="a permit for this study: flag grants whose ROWS is below the declaration"
    ),
) -> None:
    """Show a study as a permit body reviews it: what each analysis releases and at what cost.

    Example: fedomop permit review study.yaml --budget 1.0
    """
    from studies.render import render_study

    study, _ = _study(study_path)
    console.print(render_study(study), markup=False, highlight=False)
    rho = _rho_budget(budget, delta)
    share = rho / len(study.analyses)
    table = Table(title=f"privacy cost (budget epsilon={budget:g}, delta={delta:g}: rho={rho:.4g})")
    columns = (
        "analysis",
        "kind",
        "releases",
        "rows/person",
        "exact release",
        "DP release, even split",
    )
    for column in columns:
        table.add_column(column)
    for spec in study.analyses:
        rows = _declared_rows(spec)
        exact, dp = SPECIAL_RELEASES.get(
            spec.kind,
            (
                f"no epsilon; counts <{DEFAULT_MIN_CELL_COUNT} suppressed",
                f"rho {share:.4g}; count noise sd {math.sqrt(1 / (2 * share)):.3g} "
                + ("x sqrt(rows)" if rows is None else f"x {math.sqrt(max(rows, 1)):.3g}"),
            ),
        )
        shown = "every row" if rows is None else str(rows)
        table.add_row(spec.id, spec.kind, _release_kind(spec.kind), shown, exact, dp)
    console.print(table)
    for spec in study.analyses:
        print_pooled_cost(spec, share, min_honest, delta)
        print_dp_sgd_cost(spec, delta)
    console.print(
        "rows/person: the most count or sum rows one person touches, as the analysis declares "
        "it for this study; a permit's ROWS may raise it, never lower it"
    )
    if permit is not None:
        _flag_rows(permit, study)


def _flag_rows(permit_path: Path, study) -> None:
    """Name every grant of a permit whose rows per person is below the analysis's declaration
    (nodes refuse such grants); exit non-zero when there is one."""
    from studies.permit import PermitBody, PermitError, read_json

    try:
        body = PermitBody.model_validate(read_json(permit_path).get("body"))
    except (PermitError, ValueError, AttributeError) as err:
        fail(f"permit {permit_path} unreadable: {err}")
    ids = {spec.id for spec in study.analyses}
    strangers = [grant.id for grant in body.analyses if grant.id not in ids]
    if strangers:
        fail(f"permit {permit_path} grants analyses the study lacks: {strangers}")
    low = _rows_below_declaration(body.analyses, study)
    if low:
        fail("nodes refuse this permit: " + "; ".join(low))
    console.print(f"permit {body.permit_id}: every grant's rows per person covers the declaration")


def _declared_rows(spec) -> int | None:
    """The analysis's own rows-per-person declaration for this spec (None: every row)."""
    from studies.rounds import profile_of

    return profile_of(spec).rows_per_person


def _rho_budget(budget: float, delta: float) -> float:
    """The budget in rho, or a clear error for a budget or delta that is no privacy loss."""
    from privacy.accounting import epsilon_to_rho

    try:
        return epsilon_to_rho(budget, delta)
    except ValueError as err:
        fail(f"--budget {budget!r} / --delta {delta!r}: {err}")


#: Kinds released only one way: (exact release, DP release) as a permit body reads them.
SPECIAL_RELEASES = {
    "pooled_counts": (
        "not available: pooled mode needs a gaussian grant",
        "gaussian grant: each node adds its noise share, totals summed under secure "
        f"aggregation, totals <{DEFAULT_MIN_CELL_COUNT} suppressed; per-node charge below",
    ),
    "pooled_survival": (
        "not available: exact per-bin totals would show the coordinator small counts (a "
        "gaussian grant)",
        "gaussian grant: each node adds its noise share to its bin counts, totals summed under "
        "secure aggregation; per-node charge below",
    ),
    "pooled_glm": (
        "not available: its guard counts are summed with noise first (a gaussian grant)",
        "gaussian grant: the guards' persons (records, outcome and binary covariate levels) "
        "summed first with noise shares and checked against k at every node (per-node charge "
        "below); then each Newton step's score and information summed exactly under secure "
        "aggregation (fixed point, 128-bit ring), uncharged; the coordinator sees the sums only",
    ),
    "dp_sgd": (
        "logistic only, on nodes whose policy sets allow_nonprivate_models: trained without "
        "noise, weights released exactly under the GLM's regression guards; elsewhere refused",
        "dp_sgd grant: Opacus RDP per round plus its OpenDP-noised counts (sizes, hold-out "
        "risk bins), one accountant with the permit's other releases, capped by the grant's cost",
    ),
}


MECHANISMS = ("gaussian", "laplace", "dp_sgd")


def _parse_dp(
    entries: list[str], analysis_ids: list[str], rho_budget: float, delta: float
) -> dict[str, dict]:
    """``ID[:MECHANISM[:COST[:ROWS]]]`` -> PermitAnalysis fields.

    MECHANISM defaults to gaussian; without COST the budget is split evenly over the DP analyses
    (one release each); ROWS bounds the rows one person touches (default: every row). For
    ``dp_sgd`` COST is the training's total epsilon cap (default: its even share of the budget).
    """
    from privacy.accounting import rho_to_epsilon

    parsed: dict[str, dict] = {}
    for entry in entries:
        parts = entry.split(":")
        if parts[0] not in analysis_ids or len(parts) > 4:
            fail(
                f"--dp {entry!r}: expected ID[:{'|'.join(MECHANISMS)}[:COST[:ROWS]]], "
                f"ID in {analysis_ids}"
            )
        mechanism = parts[1] if len(parts) > 1 else "gaussian"
        if mechanism not in MECHANISMS:
            fail(f"--dp {entry!r}: mechanism must be one of {', '.join(MECHANISMS)}")
        try:
            cost = float(parts[2]) if len(parts) > 2 else None
            rows = int(parts[3]) if len(parts) > 3 else None
        except ValueError:
            fail(f"--dp {entry!r}: COST must be a number and ROWS an integer")
        parsed[parts[0]] = {"mechanism": mechanism, "cost": cost, "max_rows_per_person": rows}
    share = rho_budget / max(len(parsed), 1)
    for fields in parsed.values():
        if fields["cost"] is None:  # rho share, or the epsilon whose DP rho is that share
            fields["cost"] = (
                share
                if fields["mechanism"] == "gaussian"
                else math.sqrt(2 * share)
                if fields["mechanism"] == "laplace"
                else rho_to_epsilon(share, delta)
            )
    return parsed


def _rows_below_declaration(grants: list, study) -> list[str]:
    """Why each grant whose rows per person is below its analysis's declaration would be
    refused by every node (``privacy.dp.check_rows_per_person``, the gate's own check)."""
    from privacy.dp import DpError, check_rows_per_person

    low = []
    for grant in grants:
        try:
            check_rows_per_person(grant, _declared_rows(study.analysis(grant.id)))
        except DpError as err:
            low.append(str(err))
    return low


def _parse_node_keys(entries: list[str], node_names: list[str]) -> dict[str, str]:
    """``--node-key NAME=HEX`` entries as node name -> pooling identity (64 hex digits)."""
    parsed: dict[str, str] = {}
    for entry in entries:
        name, _, hex_key = entry.partition("=")
        name, hex_key = name.strip(), hex_key.strip().lower()
        if name not in node_names:
            fail(f"--node-key: node {name!r} is not in --nodes {node_names}")
        if not re.fullmatch(r"[0-9a-f]{64}", hex_key):
            fail(
                f"--node-key for {name!r}: expected NAME=HEX with the 64 hex digits "
                "`fedomop node pooling-key` prints"
            )
        if name in parsed:
            fail(f"--node-key: node {name!r} given twice")
        parsed[name] = hex_key
    return parsed


#: The ``permit issue`` option that sets each permit field, to name it in error messages.
OPTION_OF_FIELD = {
    "epsilon": "--budget",
    "delta": "--delta",
    "min_cell_count": "--min-cell-count",
    "valid_from": "--valid-from",
    "valid_until": "--valid-until",
    "nodes": "--nodes",
    "node_keys": "--node-key",
    "max_releases": "--max-releases",
    "cost": "--dp",
    "max_rows_per_person": "--dp",
    "mechanism": "--dp",
}
HINTS = {"--min-cell-count": " (a permit may raise the minimum cell count, never lower it)"}


def _day(option: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        fail(f"{option} {text!r} is not a date: expected YYYY-MM-DD")


def _plain_problems(err: ValidationError) -> list[str]:
    """One sentence per pydantic error, naming the option that set the field."""
    problems = []
    for item in err.errors(include_url=False):
        field = next((str(p) for p in reversed(item["loc"]) if str(p) in OPTION_OF_FIELD), "")
        option = OPTION_OF_FIELD.get(field)
        message = item["msg"].removeprefix("Value error, ").replace("Input should", "should")
        if option is None:
            problems.append(
                message.replace("valid_until", "--valid-until").replace(
                    "valid_from", "--valid-from"
                )
            )
            continue
        problems.append(f"{option} {item.get('input')!r}: {message}{HINTS.get(option, '')}")
    return problems


def _grant_or_fail(build: Callable[[], PermitBody]) -> PermitBody:
    """``build()``, or one ``error:`` line per problem naming its option, and exit 1."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as err:
        problems = _plain_problems(err)
    except ValueError as err:
        problems = [str(err)]
    for problem in problems[:-1]:
        say_error(problem)
    fail(problems[-1])


def issue(
    study_path: Path = typer.Argument(..., metavar="STUDY", help="study definition (YAML or JSON)"),
    key: Path = typer.Option(..., help="the permit body's private key"),
    nodes: str = typer.Option(..., help="comma-separated node names"),
    budget: float = typer.Option(..., help="epsilon each permitted node may spend on this study"),
    delta: float = typer.Option(1e-6, help="delta of the budget"),
    min_cell_count: int = typer.Option(DEFAULT_MIN_CELL_COUNT, help="may only raise a node's"),
    valid_until: str = typer.Option(..., help="last valid day, YYYY-MM-DD"),
    valid_from: str = typer.Option("", help="first valid day, YYYY-MM-DD (default today)"),
    analyses: str = typer.Option("", help="comma-separated analysis ids (default all)"),
    dp: list[str] = typer.Option(
        [],
        help="ID[:gaussian|laplace|dp_sgd[:COST[:ROWS]]]: release ID with DP; COST is rho "
        "(gaussian) or epsilon (laplace) per release, or the total epsilon cap (dp_sgd); ROWS "
        "the most rows one person touches",
    ),
    max_releases: int = typer.Option(
        0, help="answers a node gives per analysis, rounds included (0: only the budget limits)"
    ),
    purpose: str = typer.Option("", help="purpose of the data use"),
    node_key: list[str] = typer.Option(
        [],
        help="NAME=HEX: bind node NAME's identity key (from fedomop node pooling-key), with "
        "which it signs its releases; required for every node when an analysis has several "
        "rounds (glm, cox, dp_sgd, pooled_counts); repeat per node",
    ),
    out: Path = typer.Option(..., help="where to write permit.json"),
) -> None:
    """Sign a permit for a study.

    Refused when a grant's rows per person is below the analysis's declaration, or when an
    analysis runs in several rounds and a node's identity is not bound with --node-key.

    Example: fedomop permit issue study.yaml --key body/permit_body.key --nodes node-a,node-b
    --budget 1.0 --valid-until 2027-06-30 --out permit.json
    """
    from studies.permit import (
        PermitAnalysis,
        PermitBody,
        PermitError,
        issuer_fields,
        load_private_key,
        now_utc,
        sign,
        write_json,
    )
    from studies.rounds import missing_identities, multi_round_analyses

    study, digest = _study(study_path)
    all_ids = [spec.id for spec in study.analyses]
    ids = [a.strip() for a in analyses.split(",") if a.strip()] or all_ids
    unknown = sorted(set(ids) - set(all_ids))
    if unknown:
        fail(f"--analyses: {unknown} not in study (it has {all_ids})")
    today = now_utc().date()
    first_day = _day("--valid-from", valid_from) if valid_from else today
    last_day = _day("--valid-until", valid_until)
    if last_day < today:
        fail(f"--valid-until {last_day} has passed: the permit would be expired on issue")
    node_names = [n.strip() for n in nodes.split(",") if n.strip()]
    node_keys = _parse_node_keys(node_key, node_names)
    try:
        private_key = load_private_key(key)
    except PermitError as err:
        fail(str(err))
    fields = issuer_fields(private_key) | {
        "study_hash": digest,
        "study_name": study.name,
        "nodes": node_names,
        "epsilon": budget,
        "delta": delta,
        "min_cell_count": min_cell_count,
        "valid_from": first_day,
        "valid_until": last_day,
        "purpose": purpose,
        "node_keys": node_keys,
    }
    cap = {"max_releases": max_releases or None}
    # the options alone first: a bad --budget must be named before it is used in rho
    _grant_or_fail(
        lambda: PermitBody(analyses=[PermitAnalysis(id=aid, **cap) for aid in ids], **fields)
    )
    rho_budget = _rho_budget(budget, delta)
    plans = _parse_dp(dp, ids, rho_budget, delta)
    body = _grant_or_fail(
        lambda: PermitBody(
            analyses=[PermitAnalysis(id=aid, **cap, **plans.get(aid, {})) for aid in ids],
            **fields,
        )
    )
    low = _rows_below_declaration(body.analyses, study)
    if low:  # ROWS may raise an analysis's declared rows per person, never lower them
        fail("--dp: " + "; ".join(low) + " (give at least the declaration, or leave ROWS out)")
    unbound = missing_identities(study, body)
    if unbound:
        rounds = multi_round_analyses(study, ids)
        fail(
            f"analyses {rounds} run in several rounds, whose releases every node verifies "
            f"against the permit: bind each node's identity with --node-key NAME=HEX "
            f"(`fedomop node pooling-key`); missing for {unbound}"
        )
    too_costly = [g.id for g in body.analyses if g.cost_rho() > rho_budget * (1 + 1e-9)]
    too_costly += [g.id for g in body.analyses if g.mechanism == "dp_sgd" and g.cost > budget]
    if too_costly:
        fail(f"one release of {too_costly} costs more than the budget epsilon={budget:g}")
    write_json(out, sign(body, private_key))
    console.print(f"permit [bold]{body.permit_id}[/bold] for study {study.name} written to {out}")


def verify(
    permit_path: Path = typer.Argument(
        ..., metavar="PERMIT", help="the signed permit (permit.json)"
    ),
    study_path: Path = typer.Option(
        ..., "--study", metavar="STUDY", help="the study it should permit"
    ),
    pubkey: Path = typer.Option(..., help="the permit body's public key"),
) -> None:
    """Check a permit's signature, that it is for this study, and that it has not expired.

    Example: fedomop permit verify permit.json --study study.yaml --pubkey body/permit_body.pub
    """
    from studies.permit import (
        PermitError,
        key_id,
        load_public_key,
        now_utc,
        read_json,
        verify_permit,
    )

    try:
        public_key = load_public_key(pubkey)
        body = verify_permit(read_json(permit_path), {key_id(public_key): public_key})
    except PermitError as err:
        fail(f"permit {permit_path}: {err}")
    study, digest = _study(study_path)
    if digest != body.study_hash:
        fail(f"permit is for study hash {body.study_hash}, {study_path} hashes to {digest}")
    if now_utc().date() > body.valid_until:
        fail(f"permit {permit_path}: signature valid, but {body.date_problem(now_utc().date())}")
    console.print(
        f"[green]valid signature[/green] permit {body.permit_id} by key {body.issuer_key_id}\n"
        f"study {study.name} ({digest[:12]}...), nodes {', '.join(body.nodes)}, "
        f"analyses {', '.join(a.id for a in body.analyses)}\n"
        f"epsilon {body.epsilon:g} per node (delta {body.delta:g}), min cell count {body.min_cell_count}, "
        f"valid {body.valid_from} to {body.valid_until}"
    )
    not_yet = body.date_problem(now_utc().date())
    if not_yet:
        console.print(f"[yellow]note:[/yellow] {not_yet}")
    for name, hex_key in sorted(body.node_keys.items()):
        console.print(f"pooling identity of {name}: {hex_key}", soft_wrap=True)
    if not body.node_keys:
        console.print("no node keys bound: pooled analyses will be refused by every node")


def revoke_command(
    permit_id: str = typer.Argument(..., help="id of the permit to withdraw"),
    key: Path = typer.Option(..., help="the issuing permit body's private key"),
    list_path: Path = typer.Option(..., "--list", help="revocation list to create or update"),
    reason: str = typer.Option("", help="why the permit is withdrawn"),
) -> None:
    """Withdraw a permit: add it to the permit body's signed revocation list.

    Example: fedomop permit revoke PERMIT_ID --key body/permit_body.key --list revocations.json
    """
    from studies.permit import PermitError, load_private_key, read_json, revoke, write_json

    try:
        existing = read_json(list_path) if list_path.exists() else None
        write_json(list_path, revoke(existing, permit_id, load_private_key(key), reason))
    except PermitError as err:
        fail(str(err))
    console.print(f"permit {permit_id} revoked in {list_path}; give the list to the nodes")


def register(app: typer.Typer) -> None:
    """Attach the permit-body commands to the ``permit`` group."""
    add_commands(
        app,
        {
            "keygen": keygen,
            "review": review,
            "issue": issue,
            "verify": verify,
            "revoke": revoke_command,
        },
    )
