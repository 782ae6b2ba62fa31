"""Which hosts a list's http(s) rows may make the worker fetch from.

A list is data, maybe someone else's, and the worker sits inside a network: a row naming
``http://169.254.169.254/...`` would fetch the cloud's instance credentials, one naming
``http://10.0.0.7/admin`` a service only the worker can reach (server-side request forgery).
The rule, in one sentence: **an http(s) row may name a host that resolves to a cloud metadata
or link-local address in no list, and, in a list that is itself remote (http(s)://, s3://, ...),
no loopback, private, carrier-grade NAT or other non-public address either, the list's own
host excepted, unless ``source.allow_private``** (a user's own local list naming his own LAN
is fine; a downloaded list is not trusted with it).

The rule is kept twice. Where the list is read (before the run, and at ingest) every row's
host is resolved (``socket.getaddrinfo``), so that a name pointing at 127.0.0.1 is caught,
and the list is refused naming the rows. Where an image is fetched, a guarded aiohttp client
(:func:`guarded`) refuses the same addresses on connecting: what the first check cannot see,
a redirect to ``169.254.169.254`` or a name whose DNS answer changed since (rebinding).
Addresses are judged by :mod:`ipaddress` alone; the metadata addresses are the one table.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from ..fsutil import redact

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Where clouds serve instance metadata and credentials outside the link-local range, which is
# refused whole (AWS's ECS credentials live at 169.254.170.2): AWS's IPv6 IMDS, Alibaba Cloud's.
# 169.254.169.254 (AWS, Azure, GCP, Oracle) is listed for its name in messages.
METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))

PRIVATE = "private"  # scope of a remote list's rows: every non-public address refused
CLOUD = "cloud"  # scope of a local list's rows (and a remote list's own host): metadata and link-local only
# Why a fetch was refused that the list's check let through: a redirect, or DNS that changed since.
NOT_FETCHED = "not fetched (source.allow_private lets it through)"
RESOLVERS = 16  # host names resolved at once: a list may name thousands of hosts


class RefusedHost(ValueError):
    """A list's row, or a fetch it led to, names a host inside the network: bad input, exit code 2."""


def address_reason(address: IPAddress, scope: str) -> str | None:
    """Why a row in ``scope`` may not reach ``address`` (``loopback``, ...); None if it may."""
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1
    if address in METADATA:
        return "the cloud metadata address"
    if address.is_link_local:
        return "link-local, where clouds serve instance metadata and credentials"
    if scope != PRIVATE:
        return None
    for reason in ("loopback", "unspecified", "private", "multicast", "reserved"):
        if getattr(address, f"is_{reason}"):
            return reason
    return None if address.is_global else "not public"  # 100.64.0.0/10, carrier-grade NAT


def literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is written as one, else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) aside
    except ValueError:
        return None


def host_reason(host: str, scope: str) -> str | None:
    """``"localhost (127.0.0.1): loopback"``: why a row in ``scope`` may not name ``host``, judged
    by every address it resolves to; None if it may, or if it does not resolve (its fetch then
    fails, and :func:`guarded` judges whatever it resolves to by then)."""
    address = literal(host)
    if address is not None:
        reason = address_reason(address, scope)
        return f"{host}: {reason}" if reason else None
    for address in resolved(host):
        reason = address_reason(address, scope)
        if reason:
            return f"{host} ({address}): {reason}"
    return None


def resolved(host: str) -> list[IPAddress]:
    """The addresses ``host`` resolves to; none when it does not."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):  # unknown name, no DNS here, a name IDNA refuses
        return []
    return [address for info in infos if (address := literal(str(info[4][0]))) is not None]


def refused_hosts(hosts: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """``{(host, scope): why}`` for each refused one of ``hosts``, each resolved once, several at a time."""
    hosts = sorted(set(hosts))
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(RESOLVERS, len(hosts))) as pool:
        reasons = pool.map(lambda pair: host_reason(*pair), hosts)
        return {pair: reason for pair, reason in zip(hosts, reasons) if reason}


def url_host(url: str) -> str | None:
    """The host of an http(s) URL, lower case, IPv6 without brackets; None if it has none."""
    try:
        return urlsplit(url).hostname or None
    except ValueError:  # an unbalanced "[" in the netloc
        return None


def origin(url: str) -> tuple[str, str | None, int | None]:
    """``(scheme, host, port)`` as written, default ports filled in: what "the list's own host" compares."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number
        port = None
    return scheme, parts.hostname, port


# --- the guard on fetching -------------------------------------------------------------------


def guarded(options: Mapping[str, Any] | None, scope: str | None) -> Mapping[str, Any] | None:
    """fsspec's HTTP ``options`` with a client that refuses, on connecting, the addresses
    ``scope`` refuses (None: no guard). A partial of a module function, so that fsspec's
    filesystem cache, keyed by the options' text, reuses one client per scope."""
    if scope is None:
        return options
    return {**(options or {}), "get_client": functools.partial(guarded_client, scope)}


async def guarded_client(scope: str, **kwargs: Any) -> Any:
    """An aiohttp session (what fsspec's ``get_client`` returns) whose connections refuse the
    addresses ``scope`` refuses: a name's through its resolver, a literal address's (which
    aiohttp connects to without resolving) before the request and before following a redirect."""
    import aiohttp  # fsspec's HTTP filesystem needs it anyway
    from yarl import URL  # aiohttp's

    async def on_request_start(session: Any, context: Any, params: Any) -> None:
        _refuse_literal(params.url, scope)

    async def on_request_redirect(session: Any, context: Any, params: Any) -> None:
        location = params.response.headers.get("Location")
        if location:
            _refuse_literal(params.url.join(URL(location)), scope)  # as aiohttp follows it

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    trace.on_request_redirect.append(on_request_redirect)
    connector = aiohttp.TCPConnector(resolver=_guarded_resolver()(scope))
    return aiohttp.ClientSession(connector=connector, trace_configs=[trace], **kwargs)


def _refuse_literal(url: Any, scope: str) -> None:
    address = literal(url.host or "")
    reason = address_reason(address, scope) if address is not None else None
    if reason:
        raise RefusedHost(f"{redact(str(url))}: {url.host}: {reason}, {NOT_FETCHED}")


@functools.cache
def _guarded_resolver() -> type:
    """The resolver class, made once aiohttp is imported (not before: only http lists need it)."""
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class GuardedResolver(AbstractResolver):
        """aiohttp's resolver, refusing a name that resolves to an address ``scope`` refuses."""

        def __init__(self, scope: str) -> None:
            self.scope, self.inner = scope, aiohttp.ThreadedResolver()  # getaddrinfo, as the list's check

        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
            found = await self.inner.resolve(host, port, family)
            for entry in found:
                address = literal(str(entry["host"]))
                reason = address_reason(address, self.scope) if address is not None else None
                if reason:
                    raise RefusedHost(f"{host} ({address}): {reason}, {NOT_FETCHED}")
            return found

        async def close(self) -> None:
            await self.inner.close()

    return GuardedResolver
