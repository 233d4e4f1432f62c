"""The one place a Redis URL becomes a client, for the server and the trainer alike.

`redis://`, `rediss://` (TLS) and `unix://` are redis-py's own URLs (a password goes in as
`redis://:PASSWORD@host:6379/0`). `redis+sentinel://[[user]:password@]host1:26379,host2:26379/
<master>/<db>` asks those Sentinels for the current primary of `<master>` and follows failovers
(docs/deployment.md, "Beyond one Redis pod: Sentinel"). `rediss+sentinel://` is the same over TLS,
to the Sentinels and to the primary alike, configured by the query parameters that `rediss://`
takes (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
SENTINEL_SCHEMES = (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME)
SENTINEL_PORT = 26379
"""Sentinel's default port, for a host given without one."""

TLS_FILE_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
"""PEM file paths, named as redis-py's `rediss://` URLs name them."""
CERT_REQS = ("none", "optional", "required")
"""`ssl_cert_reqs` values (redis-py's; it defaults to `required`)."""
_TLS_PARAMS = (*TLS_FILE_PARAMS, "ssl_cert_reqs", "ssl_check_hostname")
_SHARED = ("retry", "retry_on_error")
"""`connect` keyword arguments that also apply to the connections to the Sentinels."""
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` or `rediss+sentinel://` URL. The password is the primary's
    (and its replicas'); `sentinel_password` (query parameter) is for Sentinels that require one
    themselves. With `tls`, the `ssl_*` fields (None: redis-py's default) apply to the
    connections to the Sentinels and to the primary."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str | None = None
    ssl_check_hostname: bool | None = None

    @property
    def scheme(self) -> str:
        return SENTINEL_TLS_SCHEME if self.tls else SENTINEL_SCHEME

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS keyword arguments (for `Redis` and `Sentinel.master_for`); empty
        without TLS."""
        if not self.tls:
            return {}
        kwargs: dict[str, Any] = {"ssl": True}
        for name in _TLS_PARAMS:
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    def __repr__(self) -> str:
        # Never print the passwords (settings and errors get logged).
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelURL({self.scheme}://{hosts}/{self.master}/{self.db})"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parses a `redis+sentinel://` or `rediss+sentinel://` URL; ValueError names what is wrong
    (never the password)."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// or {SENTINEL_TLS_SCHEME}:// URL")
    # urlsplit's hostname/port cannot read a comma-separated host list: split the netloc by hand.
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(scheme, h) for h in hostlist.split(",") if h)
    if not sentinels:
        raise ValueError(f"{scheme} URL: no Sentinel host (host1:26379,host2:26379)")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{scheme} URL: the path must be /<master-name>[/<db>]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"{scheme} URL: db {path[1]!r} is not a number")
        db = int(path[1])
    # The last value of a repeated parameter wins; an empty one counts as absent.
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"sentinel_password", *_TLS_PARAMS}
    if unknown:
        raise ValueError(f"{scheme} URL: unknown parameters {sorted(unknown)}")
    tls = scheme == SENTINEL_TLS_SCHEME
    given_tls = sorted(k for k in _TLS_PARAMS if k in query)
    if given_tls and not tls:
        raise ValueError(
            f"{scheme} URL: {given_tls} configure TLS; use {SENTINEL_TLS_SCHEME}:// for TLS"
        )
    files = {name: query.get(name) or None for name in TLS_FILE_PARAMS}
    if files["ssl_keyfile"] and not files["ssl_certfile"]:
        raise ValueError(f"{scheme} URL: ssl_keyfile needs ssl_certfile (the client certificate)")
    cert_reqs = query.get("ssl_cert_reqs") or None
    if cert_reqs is not None and cert_reqs not in CERT_REQS:
        raise ValueError(
            f"{scheme} URL: ssl_cert_reqs {cert_reqs!r} is not one of {', '.join(CERT_REQS)}"
        )
    check_hostname = None
    if query.get("ssl_check_hostname"):
        check_hostname = _BOOLS.get(query["ssl_check_hostname"].lower())
        if check_hostname is None:
            raise ValueError(
                f"{scheme} URL: ssl_check_hostname {query['ssl_check_hostname']!r} "
                "is not true or false"
            )
    return SentinelURL(
        sentinels,
        unquote(path[0]),
        db,
        username,
        password,
        query.get("sentinel_password") or None,
        tls,
        ssl_cert_reqs=cert_reqs,
        ssl_check_hostname=check_hostname,
        **files,
    )


def _host_port(scheme: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # IPv6: [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{scheme} URL: bad Sentinel address {item!r}")
    return host, int(port) if port else SENTINEL_PORT


class _Sentinel(Sentinel):
    """redis-py's Sentinel, except that "No master found" says why: redis-py 8 lists each
    Sentinel's error by its repr, `network:ConnectionError`, which hides a certificate that failed
    verification or a refused password."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        # redis-py 8.1's discover_master, with str(error) for repr(error) and the cause chained.
        errors: list[str] = []
        last_error: Exception | None = None
        for number, sentinel in enumerate(self.sentinels):
            try:
                masters = await sentinel.sentinel_masters()
            except (RedisConnectionError, RedisTimeoutError) as error:
                errors.append(str(error))
                last_error = error
                continue
            state = masters.get(service_name) if isinstance(masters, dict) else None
            if state and self.check_master_state(state, service_name):
                # Ask this Sentinel first next time.
                self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
                host = self._force_master_ip if self._force_master_ip is not None else state["ip"]
                return host, state["port"]
        reason = (
            "; ".join(errors) or "no Sentinel monitors a master by that name, or all see it down"
        )
        raise MasterNotFoundError(f"No master found for {service_name!r}: {reason}") from last_error


class _SentinelMaster(Redis):
    """A Sentinel primary's client that also closes its connections to the Sentinels, so that
    closing the client releases everything it opened."""

    sentinel_clients: Sequence[Redis] = ()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.sentinel_clients:
            await client.aclose()


def connect(url: str, **client_kwargs: Any) -> Redis:
    """A client for `url` (see the module docstring). `client_kwargs` (timeouts, retry,
    health_check_interval) apply to the connections to Redis; with Sentinel, the `socket_*`
    timeouts, `retry` and `retry_on_error` (and the URL's TLS settings) also apply to the
    connections to the Sentinels. Responses are bytes unless the caller asks for
    `decode_responses`."""
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return Redis.from_url(url, **client_kwargs)
    target = parse_sentinel_url(url)
    tls = target.tls_kwargs()
    sentinel_kwargs = {
        k: v for k, v in client_kwargs.items() if k.startswith("socket_") or k in _SHARED
    }
    sentinel_kwargs.update(tls)
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = _Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master: _SentinelMaster = sentinel.master_for(
        target.master,
        redis_class=_SentinelMaster,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls,
        **client_kwargs,
    )
    master.sentinel_clients = sentinel.sentinels
    return master
