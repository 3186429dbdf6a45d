"""Where the rules of ``proxy.rules.policy`` meet I/O: DNS answers, dials and incoming requests."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import ClientTimeout, web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from proxy.rules import errors, policy
from proxy.rules.errors import ProxyError
from proxy.wire.pool_wait import PoolWaitConnector


class CheckedResolver(AbstractResolver):
    """Refuses a name whose answer holds a denied address or one of our listeners.

    The connector dials exactly what the resolver returned (and caches it), so checking
    here checks the address actually dialled: a name that later re-resolves elsewhere
    (DNS rebinding) is checked again on that lookup.
    """

    def __init__(self, inner: AbstractResolver, check: policy.DestinationCheck) -> None:
        self._inner = inner
        self._check = check

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = policy.parse_ip(result["host"])
            if address is None:  # not an address: fail closed
                raise policy.DestinationDenied(f"{host} resolved to {result['host']!r}")
            self._check.address(host, address, result["port"])
        return results

    async def close(self) -> None:
        await self._inner.close()


class CheckedConnector(PoolWaitConnector):
    """Checks the host before any lookup: address literals never reach the resolver.

    ``_resolve_host`` is the step every new connection takes, forwarded or tunnelled
    (``proxy.wire.tunnelling.SessionResolver`` calls it too); aiohttp is pinned below 3.15.

    It also never hands out a pooled connection on which the upstream sent a response
    nobody asked for: aiohttp keeps reading idle connections and queues what it parses,
    and the next request would take that queued response as its own (a desync).
    """

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        while True:
            conn = await super().connect(req, traces, timeout)
            protocol = conn.protocol
            # A connection that carries no request yet has nothing queued, unless the
            # upstream sent bytes past its last response (RFC 9112 §9.3: a response
            # answers one request). New connections always pass: the loop ends.
            if protocol is None or (len(protocol) == 0 and protocol.exception() is None):
                return conn
            conn.close()

    def __init__(self, check: policy.DestinationCheck, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        self._check.host(host, port)
        return await super()._resolve_host(host, port, traces)


@dataclass(frozen=True, slots=True)
class Denial:
    error: ProxyError
    reason: str  # the ``reason`` label of proxy_denied_total
    headers: Mapping[str, str] = field(default_factory=dict)
    close: bool = False  # a client that may not use the proxy is not kept connected


CLIENT_NOT_ALLOWED: Final = Denial(errors.CLIENT_DENIED, "client", close=True)
AUTH_MISSING: Final = Denial(
    errors.AUTH_REQUIRED, "auth_missing", {"Proxy-Authenticate": policy.CHALLENGE}
)
AUTH_INVALID: Final = Denial(
    errors.AUTH_REQUIRED.with_text("proxy credentials not accepted"),
    "auth_invalid",
    {"Proxy-Authenticate": policy.CHALLENGE},
)


_VERDICTS_KEPT = 4096


class ClientGate:
    """Who may use the listener: client networks for everything, credentials for proxying."""

    def __init__(self, allowed: policy.Rules, accepted: Sequence[policy.Credential]) -> None:
        self._allowed = allowed
        self._tokens = tuple(credential.token for credential in accepted)
        # Peer address -> verdict. Parsing every spelling costs ~10 us a request, and a
        # sidecar sees a handful of peers; the bound keeps a scan of addresses harmless.
        self._verdicts: dict[str | None, bool] = {}

    def __call__(self, request: web.BaseRequest, *, proxied: bool) -> Denial | None:
        """The refusal for this request, None when it may go on (counted where answered)."""
        remote = request.remote
        permitted = self._verdicts.get(remote)
        if permitted is None:
            if len(self._verdicts) >= _VERDICTS_KEPT:
                self._verdicts.clear()
            permitted = self._verdicts[remote] = policy.client_permitted(remote, self._allowed)
        if not permitted:
            return CLIENT_NOT_ALLOWED
        if not proxied or not self._tokens:
            return None  # local endpoints need no credentials
        given = policy.basic_credentials(request.headers.get("Proxy-Authorization"))
        if given is None:
            return AUTH_MISSING
        return None if policy.credentials_match(given, self._tokens) else AUTH_INVALID
