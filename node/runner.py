"""The pinned node runner: the only process that executes node work for a SuperNode.

Flower's SuperNode runs whatever app bundle (FAB) the SuperLink ships, and the open-source
SuperLink accepts runs from anyone who reaches it. So ``fedomop node start`` starts the SuperNode
with ``--isolation process`` (the SuperNode then launches nothing itself) and runs this runner in
its place. The runner takes tasks from the SuperNode's local Runtime API, as Flower's SuperExec
would, but instead of installing the FAB and importing its ClientApp it:

1. checks the FAB's SHA-256 against the node's allowlist (by default only the hash of the app
   bundle of the fedomop version installed here, ``node.flower_runtime.pinned_fab_hash``);
2. refuses any other bundle with an error reply (``INVALID_FAB``): its code is never unpacked,
   imported or run;
3. for an allowed bundle, runs the *installed* ``node.client_app.answer`` (the gate), with the
   policy given on the runner's command line, never one named in a message.

One long-lived runner also avoids Flower's process start per message (a fresh Python with
imports and a DuckDB open for every round).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from node.client_app import answer

LOG = logging.getLogger("fedomop.node.runner")


def refusal_text(fab_hash: str, allowed: set[str]) -> str:
    """Why a bundle is refused (shown to the coordinator in the error reply)."""
    return (
        f"node refuses app bundle sha256:{fab_hash}: this node runs only its installed "
        f"fedomop node code (allowed bundle(s): {', '.join(sorted(allowed))})"
    )


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def keep_copy(outbox: Path, reply: Message) -> Path:
    """Write everything a reply carries (every record, bytes as base64) to ``outbox``.

    The operator's own record of what left the node; the tests read it to prove that only
    gate-released aggregates are sent.
    """
    content = reply.content if reply.has_content() else RecordDict()
    doc = {
        "reply_to": reply.metadata.reply_to_message_id,
        "error": reply.error.reason if reply.has_error() else None,
        "array_records": sorted(content.array_records),
        "metric_records": sorted(content.metric_records),
        "config_records": {
            name: {
                key: {"base64": base64.b64encode(value).decode()}
                if isinstance(value, bytes)
                else value
                for key, value in record.items()
            }
            for name, record in content.config_records.items()
        },
    }
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"{time.time_ns()}.json"
    path.write_text(json.dumps(doc, sort_keys=True))
    return path


def _answer_or_error(message: Message, policy: Path) -> Message:
    """The gate's reply; if the node itself fails (policy unreadable, CDM missing), an error
    reply naming only the error type, so the coordinator need not wait for its timeout."""
    try:
        return answer(message, policy)
    except Exception as err:
        LOG.exception("node failed before its gate could answer")
        reason = f"node error: {type(err).__name__}"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
        )


def run_task(
    address: str, token: str, policy: Path, allowed: set[str], outbox: Path | None = None
) -> bool:
    """Serve one task: pinned-hash check, then the installed gate. True when it ran the gate."""
    client = _client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, sub_status, details, ran = None, SubStatus.FAILED, "", False
    tic = time.perf_counter()
    marks: dict[str, float] = {}
    try:
        message, context, _run, fab = pull_task_input(client)
        marks["pulled"] = time.perf_counter() - tic
        fab_hash = hashlib.sha256(fab.content).hexdigest()  # the content, not its label
        if fab_hash not in allowed:
            details = refusal_text(fab_hash, allowed)
            LOG.warning(details)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
        else:
            reply = _answer_or_error(message, policy)
            ran = not reply.has_error()
            sub_status = SubStatus.COMPLETED if ran else SubStatus.FAILED
        marks["answered"] = time.perf_counter() - tic
        if outbox is not None:
            keep_copy(outbox, reply)
        push_message(client, reply, context)
        marks["pushed"] = time.perf_counter() - tic
    except Exception as err:  # a broken task must not stop the node's runner
        LOG.exception("task failed")
        details = f"{type(err).__name__}: {err}"
    finally:
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        marks["closed"] = time.perf_counter() - tic
        LOG.info("task %s in %s", sub_status, {k: round(v, 3) for k, v in marks.items()})
    return ran


def serve(
    runtime_address: str,
    policy: Path,
    allowed: set[str],
    *,
    poll_s: float = 0.1,
    stop: threading.Event | None = None,
    outbox: Path | None = None,
) -> None:
    """Take ClientApp tasks from the SuperNode at ``runtime_address`` until ``stop`` is set."""
    stop = stop or threading.Event()
    client = _client(runtime_address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    LOG.info("node runner serving %s with policy %s", runtime_address, policy)
    try:
        while not stop.is_set():
            acquired = client.AcquireTask(request)
            if acquired.HasField("task") and acquired.token:
                run_task(runtime_address, acquired.token, policy, allowed, outbox)
                continue
            time.sleep(poll_s)
    finally:
        client.close()
