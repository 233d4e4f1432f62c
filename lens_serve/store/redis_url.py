"""The one place a Redis URL becomes a client, for the server and the trainer alike.

`redis://`, `rediss://` (TLS) and `unix://` are redis-py's own URLs (a password goes in as
`redis://:PASSWORD@host:6379/0`). `redis+sentinel://[[user]:password@]host1:26379,host2:26379/
<master>/<db>` asks those Sentinels for the current primary of `<master>` and follows failovers
(docs/deployment.md, "Beyond one Redis pod: Sentinel").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
"""Sentinel's default port, for a host given without one."""


@dataclass(frozen=True)
class SentinelURL:
    """A parsed `redis+sentinel://` URL. The password is the primary's (and its replicas');
    `sentinel_password` (query parameter) is for Sentinels that require one themselves."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def __repr__(self) -> str:
        # Never print the passwords (settings and errors get logged).
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelURL({SENTINEL_SCHEME}://{hosts}/{self.master}/{self.db})"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parses a `redis+sentinel://` URL; ValueError names what is wrong (never the password)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    # urlsplit's hostname/port cannot read a comma-separated host list: split the netloc by hand.
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(h) for h in hostlist.split(",") if h)
    if not sentinels:
        raise ValueError(f"{SENTINEL_SCHEME} URL: no Sentinel host (host1:26379,host2:26379)")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{SENTINEL_SCHEME} URL: the path must be /<master-name>[/<db>]")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"{SENTINEL_SCHEME} URL: db {path[1]!r} is not a number")
        db = int(path[1])
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"{SENTINEL_SCHEME} URL: unknown parameters {sorted(unknown)}")
    sentinel_password = query.get("sentinel_password", [None])[-1]
    return SentinelURL(
        sentinels, unquote(path[0]), db, username, password, sentinel_password or None
    )


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # IPv6: [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{SENTINEL_SCHEME} URL: bad Sentinel address {item!r}")
    return host, int(port) if port else SENTINEL_PORT


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
    health_check_interval) apply to the connections to Redis; with Sentinel, its `socket_*`
    timeouts also apply to the connections to the Sentinels. Responses are bytes unless the
    caller asks for `decode_responses`."""
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return Redis.from_url(url, **client_kwargs)
    target = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in client_kwargs.items() if k.startswith("socket_")}
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master: _SentinelMaster = sentinel.master_for(
        target.master,
        redis_class=_SentinelMaster,
        db=target.db,
        username=target.username,
        password=target.password,
        **client_kwargs,
    )
    master.sentinel_clients = sentinel.sentinels
    return master
