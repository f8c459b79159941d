"""The round's state, derived by the node from the signed transcript, never taken on trust.

``TranscriptDerivation`` (a mixin of ``node.gate.Gate``): round 0's state comes from the study
alone; a later round's from the previous round's signed releases, verified and combined here;
and the claim the node signs about what it releases, for the next round's transcript.
"""

from __future__ import annotations

import hashlib
from typing import Any

import polars as pl

from node.gate_checks import Refusal, _round_limit
from node.messages import GateRequest
from node.transcript import Claim, Expected, TranscriptError, state_sha256
from node.transcript import verify as verify_transcript
from studies.model import Study
from studies.permit import (
    PermitAnalysis,
    PermitBody,
)
from studies.rounds import RoundError, missing_identities, next_state, states_agree
from studies.statistics import from_ipc, to_ipc


class TranscriptDerivation:
    """The transcript side of ``Gate``: derived state and the signed claim."""

    def _derived_state(
        self,
        study: Study,
        spec: Any,
        grant: PermitAnalysis,
        permit: PermitBody,
        request: GateRequest,
    ) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        """The state this round computes on and the nodes whose releases gave it.

        Round 0's state comes from the study alone (none). A later round's request carries the
        previous round's transcript: the node verifies every signature and claim
        (``node.transcript.verify``), derives the state with the analysis's own ``combine``
        (``studies.rounds.next_state``) and refuses a request whose state differs.
        """
        round_ = request.round
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            raise Refusal("the request's round must be a whole number >= 0")
        limit = _round_limit(spec, grant)
        if round_ >= limit:
            raise Refusal(
                f"analysis {spec.id!r} has at most {limit} round(s): round {round_} is refused"
            )
        missing = missing_identities(study, permit)
        if missing:
            raise Refusal(
                f"permit {permit.permit_id} grants a multi-round analysis but binds no identity "
                f"key for nodes {missing}: their releases could not be verified"
            )
        if round_ == 0:
            if request.state is not None or request.transcript is not None:
                raise Refusal("round 0's state comes from the study alone: the request sent one")
            return None, ()
        if request.transcript is None:
            raise Refusal(f"round {round_} needs the transcript of round {round_ - 1}")
        expected = Expected(
            permit.permit_id,
            permit.study_hash,
            spec.id,
            round_ - 1,
            self.policy.node_name,
            self._snapshot(),
            self.policy.privacy.min_nodes,
        )
        try:
            previous, released = verify_transcript(request.transcript, expected, permit.node_keys)
            tables = {node: from_ipc(payload) for node, payload in released.items()}
            derived = next_state(spec, tables, previous)
        except (TranscriptError, RoundError) as err:
            raise Refusal(f"transcript refused: {err}") from err
        except (ValueError, OSError) as err:  # unreadable Arrow bytes in a signed release
            raise Refusal(
                f"transcript refused: a release's statistics are unreadable: {err}"
            ) from err
        if not states_agree(derived, request.state):
            raise Refusal(
                f"the state sent for round {round_} is not the one its transcript gives: refused"
            )
        return request.state, tuple(sorted(released))

    def _claim(
        self,
        permit: PermitBody,
        request: GateRequest,
        state: dict[str, Any] | None,
        basis: tuple[str, ...],
        statistics: pl.DataFrame,
    ) -> Claim:
        return Claim(
            permit_id=permit.permit_id,
            study_hash=permit.study_hash,
            analysis_id=request.analysis_id,
            round=request.round,
            node=self.policy.node_name,
            state_sha256=state_sha256(state),
            basis=basis,
            snapshot=self._snapshot(),
            payload_sha256=hashlib.sha256(to_ipc(statistics)).hexdigest(),
        )
