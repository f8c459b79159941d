"""The coordinator's transport waits for each node's reply on its own.

Flower's ``pull_messages`` retries a reply whose objects never finished uploading (its node was
killed mid-reply) for up to the object-push session's 180 s. When the transport pulled all
replies in one call, that one stuck reply held the others past the round's deadline and the
whole round timed out (seen in CI: every later analysis failed). ``SlowLink`` stands in for a
SuperLink where one node's reply is stuck in that retry; the real killed-node case runs over
real processes in ``test_e2e_deployment``.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from coordinator.server_app import GridTransport


class SlowLink:
    """A grid whose nodes have replied, one of them with a reply that cannot be pulled."""

    def __init__(self, stuck_node: int, failing_node: int | None = None) -> None:
        self.stuck_node, self.failing_node = stuck_node, failing_node
        self.release = threading.Event()
        self.stuck_pulls_ended = 0
        self.sent: dict[str, SimpleNamespace] = {}

    def push_messages(self, messages: list[SimpleNamespace]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            self.sent[f"m{i}"] = message
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[SimpleNamespace]:
        replies = []
        for message_id in message_ids:
            node = self.sent[message_id].metadata.dst_node_id
            if node == self.stuck_node:
                self.release.wait(30)  # Flower's object-pull retry
                self.stuck_pulls_ended += 1
            if node == self.failing_node:
                raise ConnectionError("the SuperLink closed the connection")
            replies.append(SimpleNamespace(reply_to_message_id=message_id))
        return replies


def _messages(nodes: list[int]) -> list[SimpleNamespace]:
    """What the transport reads of a Flower message (a real one needs a run's identity)."""
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in nodes]


def test_a_stuck_reply_does_not_hold_up_the_others():
    link = SlowLink(stuck_node=1)
    transport = GridTransport(link, poll_s=0.01)
    replies = transport._exchange(_messages([1, 2, 3]), timeout=2.0)
    returned_while_stuck = link.stuck_pulls_ended == 0
    link.release.set()
    assert {n: r.reply_to_message_id for n, r in replies.items()} == {2: "m1", 3: "m2"}
    assert sorted(replies) == [2, 3]  # the stuck node's reply is missing: a timeout
    assert returned_while_stuck  # the deadline held, not the stuck pull


def test_a_failed_pull_is_an_error_of_that_node_only():
    link = SlowLink(stuck_node=-1, failing_node=2)
    replies = GridTransport(link, poll_s=0.01)._exchange(_messages([1, 2, 3]), timeout=5.0)
    assert sorted(replies) == [1, 2, 3]
    assert replies[2] == (
        "error: reply could not be pulled: ConnectionError: the SuperLink closed the connection"
    )
    assert replies[1].reply_to_message_id == "m0" and replies[3].reply_to_message_id == "m2"
