"""The NATS auth callout: every connection that is not a control-plane service's comes here.

A node connects with its address as the token and the EIP-191 signature of the nonce the
server sent it (stipple_common.identity). The callout recovers the signer; a missing or
wrong signature is refused. A proven key is admitted (admission.py):

- as a **node** (`node_permissions`: its own subjects only) when the chain says it holds the
  minimum stake, is not leaving and is not banned; its two work consumers are created
  first, so that it can fetch at once (it cannot create consumers itself);
- else as an **applicant** (`applicant_permissions`): it may ask ``rpc.join.<id>`` why, and
  reach the chain relay for its own address (to stake), nothing else.

The user JWT's name is the node id (``<id>`` or ``<id>:applicant``): what the server's
connection list shows, and what the enforcer (enforcer.py) matches when it must close
a node's connections.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import nkeys
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from stipple_common import subjects
from stipple_common.identity import is_node_id, nonce_signer
from stipple_common.messages import encode
from stipple_common.permissions import APP_ACCOUNT, applicant_permissions, node_permissions

from . import jwt
from .admission import Registry
from .metrics import CalloutMetrics

log = structlog.get_logger("stipple.gatekeeper.callout")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
APPLICANT_SUFFIX = ":applicant"


def connection_name(node_id: str, level: str) -> str:
    return node_id if level == "node" else node_id + APPLICANT_SUFFIX


def parse_connection_name(name: str) -> tuple[str, str] | None:
    """(node id, level) of a connection the callout admitted, or None for anyone else."""
    node_id, _, rest = name.partition(":")
    if not is_node_id(node_id) or rest not in ("", "applicant"):
        return None
    return node_id, ("node" if not rest else "applicant")


class Callout:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        registry: Registry,
        issuer: nkeys.KeyPair,
        metrics: CalloutMetrics,
        node_ttl_s: float,
        applicant_ttl_s: float,
    ) -> None:
        self.js = js
        self.registry = registry
        self.issuer = issuer
        self.node_ttl_s = node_ttl_s
        self.applicant_ttl_s = applicant_ttl_s
        self._provisioned: OrderedDict[str, float] = OrderedDict()  # node id -> when its consumers were made
        self.metrics = metrics

    async def serve(self, auth_nc: NATS, app_nc: NATS) -> list[object]:
        """Answer the server's authorization requests (on the AUTH connection) and the
        nodes' ``rpc.join.<id>`` questions (on the APP one)."""
        return [
            await auth_nc.subscribe(AUTH_SUBJECT, queue=subjects.GATEKEEPER_QUEUE, cb=self.on_request),
            await app_nc.subscribe(
                subjects.join_rpc_subject("*"), queue=subjects.GATEKEEPER_QUEUE, cb=self.on_join_question
            ),
        ]

    async def on_join_question(self, msg: Msg) -> None:
        node_id = subjects.subject_token(msg.subject, 2)
        if msg.reply:
            await msg.respond(encode(self.registry.status(node_id)))

    async def on_request(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            request = jwt.parse_request(msg.data.decode(errors="replace"))
        except jwt.BadRequest as exc:  # without its user key there is nothing to answer to
            self.metrics.refusals.labels("bad_request").inc()
            log.warning("callout_bad_request", error=exc.message)
            return
        try:
            answer = await self.decide(request)
        except Exception as exc:  # the one boundary: the server waits for an answer, and the cause is logged once
            log.exception("callout_failed")
            answer = self._refuse(request, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.seconds.observe(time.perf_counter() - started)
        if msg.reply:
            await msg.respond(answer)

    async def decide(self, request: jwt.AuthRequest) -> bytes:
        signer = nonce_signer(request.nonce, request.signature) if request.nonce and request.signature else None
        if signer is None:
            return self._refuse(request, "bad_signature", "no valid signature of the server's nonce")
        if request.token.lower() != signer:
            return self._refuse(request, "token_mismatch", f"the token names {request.token!r}, the key is {signer}")
        status = self.registry.status(signer)
        if status.level == "node":
            try:
                await self.provision(signer)
            except Exception as exc:  # the node cannot work without its consumers: let it try again
                log.warning("consumers_not_created", node_id=signer, error=str(exc))
                return self._refuse(request, "consumers", f"its work consumers could not be created: {exc}")
            permissions, ttl = node_permissions(signer), self.node_ttl_s
        else:
            permissions, ttl = applicant_permissions(signer), self.applicant_ttl_s
        user = jwt.user_jwt(
            request,
            name=connection_name(signer, status.level),
            account=APP_ACCOUNT,
            permissions=permissions,
            ttl_s=ttl,
            issuer=self.issuer,
        )
        self.metrics.admissions.labels(status.level, status.reason).inc()
        log.info("admitted", node_id=signer, level=status.level, reason=status.reason, host=request.host)
        return jwt.response(request, self.issuer, user=user)

    def _refuse(self, request: jwt.AuthRequest, reason: str, detail: str) -> bytes:
        self.metrics.refusals.labels(reason).inc()
        log.warning("refused", reason=reason, detail=detail, host=request.host, token=request.token[:64])
        return jwt.response(request, self.issuer, error=f"{reason}: {detail}")

    async def provision(self, node_id: str, refresh_s: float = 3600.0) -> None:
        """Create (or confirm) the node's two consumers on WORK: idempotent, and done again
        at most once an hour per node (a consumer lives 24 h after its node went away)."""
        now = time.monotonic()
        if now - self._provisioned.get(node_id, -refresh_s) < refresh_s:
            return
        for config in (subjects.node_work_consumer(node_id), subjects.node_control_consumer(node_id)):
            await self.js.add_consumer(subjects.WORK_STREAM, config, timeout=2.0)
        self._provisioned[node_id] = now
        self._provisioned.move_to_end(node_id)
        while len(self._provisioned) > 100_000:
            self._provisioned.popitem(last=False)
