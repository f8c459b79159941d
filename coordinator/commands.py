"""Commands of the coordinator role: ``fedomop run``, ``fedomop demo`` and ``fedomop coordinator``.

- ``fedomop run STUDY --permit PERMIT (--simulation NODES.toml | --superlink ADDR) --out DIR``
- ``fedomop demo [--nodes K] [--out DIR]``: synthetic nodes, permit, the demo study, the report.
- ``fedomop coordinator certs``: a CA and the SuperLink's TLS certificate (see coordinator.deploy).
- ``fedomop coordinator start``: a SuperLink, TLS and SuperNode authentication on by default.
- ``fedomop coordinator register-node``: admit a node's public key to the SuperLink.
- ``fedomop coordinator catalogue``: merge node HealthDCAT-AP descriptions into one catalogue.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedomop.lifecycle import call_interruptibly, owned_group, wait
from fedomop.ui import EXIT_NO_RESULT, fail, say_error
from node.flower_runtime import flower_env, use_flower_env

if TYPE_CHECKING:  # the study runner loads the analyses (scikit-learn, Flower): per command
    from coordinator.study_runner import StudyOutcome, StudyPlan

console = Console()


@contextmanager
def progress_reporter(title: str):
    """A rich spinner whose text follows the study runner's progress messages; without a
    terminal (a log file, CI), the messages as plain lines and no spinner frames."""
    if not console.is_terminal:

        def say_plain(text: str) -> None:
            if not text.startswith(" "):
                console.print(text, markup=False, highlight=False)

        yield say_plain
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task(title)

        def say(text: str) -> None:
            bar.update(task, description=f"{title}: {text.strip()}")
            if not text.startswith(" "):
                bar.console.print(f"[dim]{text}[/dim]")

        yield say


def print_summary(outcome: StudyOutcome | dict[str, Any]) -> None:
    """Per analysis: status, rounds, seconds, how many nodes contributed and its key result;
    then who did not contribute, and why."""
    record = outcome if isinstance(outcome, dict) else asdict(outcome)
    table = Table(title="Study results")
    for column in ("analysis", "kind", "status", "rounds", "seconds", "nodes"):
        table.add_column(column, overflow="fold")
    missing = Table(title="Nodes that did not contribute")
    for column in ("analysis", "node", "status", "reason"):
        missing.add_column(column, overflow="fold")
    for analysis in record["analyses"]:
        aid = analysis["analysis_id"]
        nodes = [n for n in record["nodes"] if n["analysis_id"] == aid]
        ok = sum(n["status"] == "contributed" for n in nodes)
        colour = "green" if analysis["status"] == "finished" else "red"
        seconds = sum(analysis["round_seconds"]) + analysis["combine_seconds"]
        table.add_row(
            aid,
            analysis["kind"],
            f"[{colour}]{analysis['status']}[/{colour}] {analysis['reason']}".strip(),
            str(analysis["rounds"]),
            f"{seconds:.1f}",
            f"{ok} of {len(nodes)}",
        )
        for n in nodes:
            if n["status"] != "contributed":
                missing.add_row(aid, n["node"], n["status"], n["reason"])
    console.print(table)
    startup = record.get("phases", {}).get("runtime_startup_s")
    if startup is not None:
        console.print(
            f"simulation start-up (Ray workers, node gates): {startup:.1f} s, not in the times above"
        )
    for analysis in record["analyses"]:
        if analysis.get("key_result"):
            line = escape(analysis["key_result"])
            console.print(f"[bold]{escape(analysis['analysis_id'])}[/bold]: {line}")
    if missing.row_count:
        console.print(missing)
    console.print(f"results: [bold]{record['out_dir']}[/bold]")
    if record.get("report"):
        console.print(f"report:  [bold]{record['report']}[/bold]")


def _plan(
    study: Path, permit: Path, out: Path, min_nodes: int, timeout: float, pubkey: Path | None
) -> StudyPlan:
    """The plan to run, once the permit passed the checks the coordinator can make itself."""
    from coordinator.study_runner import StudyPlan
    from studies.canonical import canonical_data
    from studies.loading import load_study
    from studies.model import StudyError
    from studies.permit import PermitError, read_json

    try:
        loaded = load_study(study)
        permit_doc = read_json(permit)
    except (StudyError, PermitError) as err:
        fail(str(err))
    if not isinstance(permit_doc, dict) or "body" not in permit_doc:
        fail(f"{permit} is not a signed permit (expected keys 'body' and 'signature')")
    problem = permit_problem(loaded, permit_doc, pubkey)
    if problem:
        fail(f"permit {permit}: {problem}; nothing was started")
    return StudyPlan(canonical_data(loaded), permit_doc, str(out.resolve()), min_nodes, timeout)


def _resumed(results: Path, pubkey: Path | None) -> StudyPlan:
    """The plan saved in ``results`` by the run being resumed, its permit checked again (it
    may have expired since)."""
    from coordinator.study_runner import StudyPlan
    from studies.loading import study_from_data
    from studies.model import StudyError

    try:
        plan = StudyPlan.resumed(results)
        study = study_from_data(plan.study)
    except (ValueError, StudyError) as err:
        fail(str(err))
    problem = permit_problem(study, plan.permit, pubkey)
    if problem:
        fail(f"permit of the run in {results}: {problem}; nothing was started")
    return plan


def permit_problem(study: Any, permit_doc: dict[str, Any], pubkey: Path | None) -> str | None:
    """Why every node would refuse this permit, or None: the signature (against ``pubkey``
    when given), the study it binds, the node identities a multi-round analysis needs, its
    dates. Milliseconds, so a run that cannot succeed
    fails before any Flower process starts; the nodes' gates check all of it again."""
    from pydantic import ValidationError

    from studies.canonical import study_hash
    from studies.permit import (
        PermitBody,
        PermitError,
        key_id,
        load_public_key,
        now_utc,
        verify_permit,
    )
    from studies.rounds import missing_identities

    try:
        if pubkey is not None:
            public_key = load_public_key(pubkey)
            body = verify_permit(permit_doc, {key_id(public_key): public_key})
        else:
            body = PermitBody.model_validate(permit_doc.get("body"))
    except PermitError as err:
        return str(err)
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return f"malformed permit body: {fields}"
    digest = study_hash(study)
    if body.study_hash != digest:
        return f"it permits study hash {body.study_hash[:12]}..., this study hashes to {digest[:12]}..."
    dates = body.date_problem(now_utc().date())
    unbound = missing_identities(study, body)
    if dates or not unbound:
        return dates
    return (
        f"it grants a multi-round analysis but binds no identity key for nodes {unbound} "
        "(permit issue --node-key NAME=HEX), so every node would refuse it"
    )


def exit_for(record: StudyOutcome | dict[str, Any]) -> None:
    """Exit 3 (``EXIT_NO_RESULT``) naming each analysis without a result: a study that did
    not produce its results must not read as success to a script."""
    data = record if isinstance(record, dict) else asdict(record)
    failed = [a for a in data["analyses"] if a["status"] != "finished"]
    if not failed:
        return
    for analysis in failed:
        refusals = [
            f"{n['node']} {n['status']} ({n['reason']})"
            for n in data["nodes"]
            if n["analysis_id"] == analysis["analysis_id"] and n["status"] != "contributed"
        ]
        say_error(
            f"analysis {analysis['analysis_id']!r} has no result: {analysis['reason']}"
            + (f"; {'; '.join(refusals)}" if refusals else "")
        )
    fail(f"{len(failed)} of {len(data['analyses'])} analyses have no result", EXIT_NO_RESULT)


#: ``fedomop run --resume``: the results folder whose saved plan runs again.
ResumeFolder = typer.Option(
    None,
    "--resume",
    help="a results folder of a run that was interrupted: run its plan again; nodes answer "
    "what they released before from their ledgers, charging nothing twice",
)


def run(
    study: Path | None = typer.Argument(
        None, metavar="STUDY", help="study definition (YAML or JSON); not with --resume"
    ),
    permit: Path | None = typer.Option(None, help="the signed permit (permit.json)"),
    simulation: Path | None = typer.Option(None, help="NODES.toml: run in Flower simulation"),
    superlink: str | None = typer.Option(None, help="SuperLink address host:port (deployment)"),
    out: Path = typer.Option(Path("results"), help="results folder"),
    min_nodes: int = typer.Option(2, help="fewest nodes whose statistics make a result"),
    timeout: float = typer.Option(120.0, help="seconds to wait for nodes in each round"),
    expected_nodes: int = typer.Option(0, help="deployment: wait for this many nodes first"),
    wait_nodes: float = typer.Option(
        60.0, help="deployment: seconds to wait for --expected-nodes, then go on with those there"
    ),
    root_cert: Path | None = typer.Option(None, help="deployment: CA certificate of the SuperLink"),
    insecure: bool = typer.Option(False, "--insecure", help="deployment: no TLS (testing only)"),
    pubkey: Path | None = typer.Option(
        None, help="the permit body's public key: check the permit's signature before starting"
    ),
    resume: Path | None = ResumeFolder,
) -> None:
    """Run a permitted study over Flower (simulation or a deployed SuperLink).

    Exits 0 when every analysis has a result, 3 when any has none (the nodes that refused
    and why are listed), 1 on bad input or a permit no node would accept.

    Example: fedomop run study.yaml --permit permit.json --simulation nodes.toml --out results
    """
    if (simulation is None) == (superlink is None):
        fail("give exactly one of --simulation NODES.toml or --superlink ADDR")
    if superlink is not None and not insecure and root_cert is None:
        fail("--superlink needs --root-cert CA.crt (or --insecure for a test SuperLink)")
    plan = _resumed(resume, pubkey) if resume else None
    if plan is None:
        if study is None or permit is None:
            fail("give STUDY and --permit PERMIT, or --resume RESULTS to continue a run")
        plan = _plan(study, permit, out, min_nodes, timeout, pubkey)
    if simulation is not None:
        from coordinator.simulation import load_nodes, run_simulated

        try:
            policies = load_nodes(simulation)
        except ValueError as err:
            fail(str(err))
        plan.save()  # only once the input is known good: a refused command leaves no folder
        with progress_reporter("simulation") as say:
            outcome = call_interruptibly(run_simulated, plan, policies, say)
        print_summary(outcome)
        exit_for(outcome)
        return
    plan.save()
    record = run_deployed(plan, superlink, root_cert, insecure, expected_nodes, wait_nodes)
    print_summary(record)
    exit_for(record)


def run_deployed(
    plan: StudyPlan,
    superlink: str,
    root_cert: Path | None,
    insecure: bool,
    expected_nodes: int = 0,
    wait_nodes_s: float = 60.0,
    wait_s: float = 3600.0,
) -> dict[str, Any]:
    """Submit the study to a SuperLink, wait for the run, return the federation record."""
    from coordinator import deploy
    from coordinator.server_app import EXPECTED_NODES_KEY, NODE_WAIT_KEY, PLAN_KEY

    use_flower_env()
    client = deploy.control_client(superlink, root_cert, insecure)
    try:
        if expected_nodes:
            wait_for_nodes(client, expected_nodes, wait_nodes_s)
        config = {PLAN_KEY: plan.to_json(), EXPECTED_NODES_KEY: expected_nodes,
                  NODE_WAIT_KEY: wait_nodes_s}  # fmt: skip
        run_id = deploy.start_run(client, config)
        with progress_reporter(f"run {run_id} on {superlink}"):
            sub_status, details = deploy.wait_run(client, run_id, wait_s)
    except TimeoutError as err:
        fail(str(err))
    except Exception as err:
        if "httpx" not in type(err).__module__:
            raise
        fail(
            connection_problem(err, superlink, root_cert) + _resume_hint(plan, superlink, root_cert)
        )
    finally:
        client.close()
    record_path = Path(plan.out_dir) / "federation.json"
    if sub_status != "completed" or not record_path.is_file():
        ended = f"run {run_id} ended {sub_status or 'without status'}: {details or 'no details'}"
        fail(ended + _resume_hint(plan, superlink, root_cert))
    return json.loads(record_path.read_text())


def _resume_hint(plan: StudyPlan, superlink: str, root_cert: Path | None) -> str:
    """How to finish a run the SuperLink lost: nodes replay what they released (same request
    ids, from their ledgers), so running the saved plan again charges nothing twice."""
    return (
        f"; the nodes keep what they released: finish the study with `fedomop run --resume "
        f"{plan.out_dir} --superlink {superlink} "
        + (f"--root-cert {root_cert}`" if root_cert else "--insecure`")
    )


def wait_for_nodes(client: Any, expected: int, wait_s: float, poll_s: float = 1.0) -> list[str]:
    """Wait up to ``wait_s`` for ``expected`` SuperNodes, saying who is connected as it
    changes; then go on with those there (the study's ``min_nodes`` decides if that is enough)."""
    from coordinator.deploy import online_nodes

    deadline = time.monotonic() + wait_s
    seen: list[str] | None = None
    while True:
        nodes = online_nodes(client)
        if nodes != seen:
            names = ", ".join(nodes) or "none yet"
            console.print(f"waiting for {expected} node(s): {len(nodes)} connected ({names})")
            seen = nodes
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() >= deadline:
            console.print(
                f"[yellow]{len(nodes)} of {expected} expected node(s) connected after "
                f"{wait_s:g} s (--wait-nodes): going on with them[/yellow]"
            )
            return nodes
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def demo(
    nodes: int = typer.Option(3, min=2, max=30, help="number of synthetic nodes"),
    out: Path = typer.Option(Path("fedomop-demo"), help="folder for nodes, permit and results"),
    timeout: float = typer.Option(300.0, help="seconds to wait for nodes in each round"),
    rare_disease: bool = typer.Option(
        False,
        "--rare-disease",
        help="the rare-disease example instead: 8 nodes with 1-6 cases each, pooled counts, "
        "survival and a logistic model under secure aggregation (--nodes is ignored)",
    ),
) -> None:
    """Generate synthetic nodes, permit the demo study, run it over Flower simulation, report.

    Nodes already built in --out are reused (it says so). Exits like fedomop run.

    Example: fedomop demo --nodes 3 --out demo-out
    """
    from coordinator.demo import run_demo

    if rare_disease:
        _rare_disease_demo(out)
        return
    with progress_reporter("demo") as say:
        outcome = call_interruptibly(run_demo, out, nodes, timeout, say)
    print_summary(outcome)
    exit_for(outcome)


def _rare_disease_demo(out: Path) -> None:
    """``demo --rare-disease``: run ``coordinator.rare_disease``, print its side-by-side table;
    exit 3 when a pooled analysis released nothing."""
    from coordinator.rare_disease import run_rare_disease

    with progress_reporter("demo") as say:
        outcome = call_interruptibly(run_rare_disease, out, say)
    console.print((out.resolve() / "report.md").read_text(), markup=False, highlight=False)
    if outcome.failures:
        console.print(f"[red]nothing released for {sorted(outcome.failures)}[/red]")
        raise typer.Exit(3)


def certs(
    out: Path = typer.Option(Path("certs"), help="folder for ca.crt, server.pem and keys"),
    host: list[str] = typer.Option(
        ["127.0.0.1", "localhost"], help="host names/IPs nodes use to reach the SuperLink"
    ),
    days: int = typer.Option(365, help="validity in days"),
) -> None:
    """Make a CA and a SuperLink TLS certificate; give ca.crt (only) to the nodes.

    Name with --host every address nodes and operators use to reach the SuperLink.

    Example: fedomop coordinator certs --out certs --host coordinator.example.org
    """
    from coordinator.deploy import make_certificates

    paths = make_certificates(out, host, days)
    console.print(f"CA certificate (give to nodes): [bold]{paths.ca_cert}[/bold]")
    console.print(f"SuperLink certificate/key: {paths.server_cert}, {paths.server_key}")
    console.print(f"[yellow]keep {paths.ca_key} offline[/yellow]")


def superlink_command(
    certs_dir: Path | None, host: str, port: int, fleet_port: int, state: Path | None
) -> list[str]:
    """The flower-superlink command line: TLS and SuperNode auth unless ``certs_dir`` is None."""
    command = [
        "flower-superlink",
        "--host", host,
        "--port", str(port),
        "--fleet-api-address", f"{host}:{fleet_port}",
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if certs_dir is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", str(certs_dir / "ca.crt"),
            "--ssl-certfile", str(certs_dir / "server.pem"),
            "--ssl-keyfile", str(certs_dir / "server.key"),
            "--enable-supernode-auth",
        ]  # fmt: skip
    if state is not None:
        command += ["--database", str(state)]
    return command


def start(
    certs_dir: Path | None = typer.Option(
        None, "--certs", help="folder written by 'fedomop coordinator certs'"
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for all)"),
    port: int = typer.Option(9093, help="SuperLink HTTP port (Fleet, Control and Runtime APIs)"),
    fleet_port: int = typer.Option(9092, help="port of Flower's legacy gRPC Fleet API"),
    state: Path | None = typer.Option(
        None,
        help="SQLite file for SuperLink state: registered node keys and runs survive a restart "
        "(nodes reconnect by themselves; resume a run it cut with fedomop run --resume)",
    ),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no node auth (testing only)"),
) -> None:
    """Start the coordinator's SuperLink (TLS and SuperNode authentication on by default).

    SIGINT or SIGTERM stops the SuperLink and its SuperExec (exit 130 or 143).

    Example: fedomop coordinator start --certs certs --host 0.0.0.0
    """
    if not insecure and (certs_dir is None or not (certs_dir / "server.pem").is_file()):
        fail("give --certs DIR from `fedomop coordinator certs` (or --insecure for testing)")
    command = superlink_command(None if insecure else certs_dir, host, port, fleet_port, state)
    console.print(
        f"starting SuperLink on {host}:{port}" + (" [red](insecure)[/red]" if insecure else "")
    )
    if state is None:
        console.print("[yellow]state in memory: a restart forgets every registered node[/yellow]")
    with owned_group(command, env=flower_env()) as superlink:  # stopped whole on any exit
        code = wait(superlink)
    if code:
        fail(f"flower-superlink exited with code {code}: see its log above", code)


def register_node_command(
    public_key: Path = typer.Argument(..., help="the node's public key (<name>.pub)"),
    superlink: str = typer.Option("127.0.0.1:9093", help="SuperLink address host:port"),
    root_cert: Path = typer.Option(..., help="CA certificate of the SuperLink"),
    name: str = typer.Option("", help="a name for the node (default: the key file's stem)"),
) -> None:
    """Admit a node: register its SuperNode public key with the SuperLink.

    Example: fedomop coordinator register-node hospital-a.pub --superlink 127.0.0.1:9093
    --root-cert certs/ca.crt
    """
    from coordinator.deploy import control_client, register_node

    if not root_cert.is_file():
        fail(f"--root-cert {root_cert}: no such file")
    use_flower_env()
    client = control_client(superlink, root_cert)
    try:
        node_id = register_node(client, public_key, name or None)
    except (OSError, ValueError) as err:
        fail(f"{public_key}: not a node public key from `fedomop node keys` ({err})")
    except Exception as err:  # httpx's errors, imported with Flower's client only
        fail(connection_problem(err, superlink, root_cert, public_key))
    finally:
        client.close()
    console.print(f"node [bold]{name or public_key.stem}[/bold] registered as SuperNode {node_id}")


def catalogue(
    nodes: list[Path] = typer.Argument(..., help="node descriptions (dataset.ttl or .jsonld)"),
    out: Path = typer.Option(..., "--out", help="catalogue file (.ttl, or .jsonld for JSON-LD)"),
    publisher: str = typer.Option(..., help="organisation publishing the catalogue"),
    publisher_email: str = typer.Option(..., help="its contact email"),
    title: str = typer.Option("Health datasets of the fedomop network", help="catalogue title"),
    description: str = typer.Option(
        "Datasets reachable through fedomop federated analysis under EHDS data permits.",
        help="catalogue description",
    ),
    iri: str | None = typer.Option(None, help="the catalogue's IRI (default: derived)"),
    shapes: list[Path] = typer.Option(
        [], "--shapes", help="further SHACL shapes to validate with (e.g. DCAT-AP 3)"
    ),
) -> None:
    """Merge node HealthDCAT-AP descriptions into one dcat:Catalog for a national access point.

    Each node description (from fedomop node describe) is validated first; --shapes adds
    further SHACL shapes, such as the DCAT-AP 3 ones.

    Example: fedomop coordinator catalogue a/dataset.ttl b/dataset.jsonld --out catalogue.ttl
    --publisher "National access point" --publisher-email nap@example.org
    """
    from datetime import UTC, datetime

    from coordinator.catalogue import CatalogueError, CatalogueText, merge, write_catalogue

    missing = [str(p) for p in [*nodes, *shapes] if not p.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    text = CatalogueText(title, description, publisher, publisher_email, iri)
    try:
        graph = merge(nodes, text, datetime.now(UTC).date(), shapes)
        write_catalogue(graph, out)
    except (CatalogueError, OSError) as err:
        fail(str(err))
    console.print(f"catalogue of {len(nodes)} node description(s) written to [bold]{out}[/bold]")


def connection_problem(
    err: Exception, superlink: str, root_cert: Path | None, key: Path | None = None
) -> str:
    """A plain sentence for a failed Control API call: refused, TLS, or the SuperLink's no."""
    import httpx
    from flwr.supercore.error.base import FlowerError

    if isinstance(err, httpx.HTTPStatusError):
        flower = FlowerError.from_json(err.response.text)
        said = flower.message if flower else err.response.reason_phrase
        if err.response.status_code == 412:
            what = key or "the request"
            return f"the SuperLink at {superlink} refused {what}: {said} (registered before?)"
        return f"the SuperLink at {superlink} answered {err.response.status_code}: {said}"
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip()
        if "mismatch" in reason:
            return (
                f"the SuperLink's TLS certificate is not valid for {superlink.rsplit(':', 1)[0]} "
                f"({reason}): use an address given to `fedomop coordinator certs --host`"
            )
        return f"the SuperLink at {superlink} is not verified by --root-cert {root_cert} ({reason})"
    if isinstance(err, httpx.TransportError):
        return (
            f"no SuperLink answers at {superlink} ({text}): is `fedomop coordinator start` "
            "running, with that --port?"
        )
    return f"the call to the SuperLink at {superlink} failed: {type(err).__name__}: {text}"


def register(app: typer.Typer, coordinator_app: typer.Typer) -> None:
    """Attach ``run``/``demo`` to ``app`` and the deployment commands to ``coordinator_app``."""
    app.command("run")(run)
    app.command("demo")(demo)
    coordinator_app.command("certs")(certs)
    coordinator_app.command("start")(start)
    coordinator_app.command("register-node")(register_node_command)
    coordinator_app.command("catalogue")(catalogue)
