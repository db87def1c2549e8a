"""The crawler cannot be aimed at its host: no request reaches a non-public address.

Loopback, private (RFC 1918, IPv6 ULA), link-local (169.254.169.254, cloud metadata), shared (CGNAT),
multicast, reserved and unspecified addresses, and IPv6 forms that embed one (IPv4-mapped, NAT64,
6to4, Teredo), are refused, whether a link, a redirect or a hostname that resolves there leads to
them. Two exceptions: the seeds' own addresses when a seed is itself non-public (the local mirror on
127.0.0.1; address and port, as the seed resolved when the crawl started), and the networks the user
allows (``crawl.allow_private``).

The check sits where the connection is made: :class:`GuardedResolver` is the reactor's name resolver,
so every connection Scrapy opens (IP literals included: Twisted's HostnameEndpoint resolves those too)
goes only to addresses it has checked; a name that resolves elsewhere by the time of the connection
(DNS rebinding) is refused then. :class:`AddressGuardMiddleware` checks each request before it is
sent (so a refused host's robots.txt is never asked for) and raises :class:`RefusedAddress`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from scrapy.exceptions import IgnoreRequest
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from zope.interface import implementer

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedAddress(IgnoreRequest):
    """A request whose host resolves only to addresses the crawler may not reach."""


def embedded(ip: IPAddress) -> list[IPAddress]:
    """The addresses a connection to `ip` may reach: an IPv4-mapped IPv6 address is its IPv4 address;
    a NAT64, 6to4 or Teredo address is itself and the IPv4 addresses it carries."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return [ip.ipv4_mapped]
        found: list[IPAddress] = [ip, *(a for a in (ip.sixtofour, *(ip.teredo or ())) if a is not None)]
        if ip in NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return found
    return [ip]


def _public(a: IPAddress) -> bool:
    return a.is_global and not (a.is_multicast or a.is_reserved or a.is_unspecified)


def is_public(ip: IPAddress) -> bool:
    """Whether `ip` is a public unicast address (and so is every address it carries)."""
    return all(_public(a) for a in embedded(ip))


def url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class AddressGuard:
    """Which (address, port) the crawl may connect to; the refusals it made, by (host, port)."""

    def __init__(self, exempt: Iterable[tuple[str, int]] = (), allow: Iterable[str] = ()):
        self.exempt = {(ipaddress.ip_address(ip), port) for ip, port in exempt}
        self.allow = [ipaddress.ip_network(net) for net in allow]
        self.refusals: dict[tuple[str, int], str] = {}

    @classmethod
    def for_seeds(cls, seeds: Iterable[str], allow: Iterable[str] = ()) -> AddressGuard:
        """Exempt each seed's non-public addresses (its address and port, resolved now)."""
        exempt = set()
        for seed in seeds:
            host, port = url_host_port(seed)
            ip = literal(host)
            if ip is not None:
                addresses = [ip]
            else:
                try:
                    addresses = [ipaddress.ip_address(info[4][0].split("%")[0])
                                 for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
                except (OSError, UnicodeError, ValueError):
                    addresses = []     # the seed's own request fails and says why
            exempt |= {(str(a), port) for a in addresses if not is_public(a)}
        return cls(exempt, allow)

    def permits(self, ip: IPAddress, port: int) -> bool:
        reached = embedded(ip)
        if len(reached) == 1 and (reached[0], port) in self.exempt:
            return True
        return all(_public(a) or any(a.version == net.version and a in net for net in self.allow) for a in reached)

    def check(self, host: str, port: int, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        """The addresses of `host` that may be reached; when none may, the refusal is recorded."""
        addresses = list(addresses)
        allowed = [ip for ip in addresses if self.permits(ip, port)]
        if addresses and not allowed:
            why = f"{host} resolves to non-public {', '.join(sorted({str(ip) for ip in addresses}))}"
            if literal(host) is not None:
                why = f"{host} is a non-public address"
            self.refusals[(host.lower(), port)] = why
            logger.warning("crawl: refused %s:%d (%s)", host, port, why)
        return allowed


def ip_of(address) -> IPAddress | None:
    try:
        return ipaddress.ip_address(address.host.split("%")[0])
    except (AttributeError, ValueError):
        return None


@implementer(IResolutionReceiver)
class _Filter:
    """Passes on to `receiver` the resolved addresses the guard permits, once resolution completes."""

    def __init__(self, receiver, guard: AddressGuard, host: str, port: int):
        self.receiver, self.guard, self.host, self.port = receiver, guard, host, port
        self.addresses: list = []

    def resolutionBegan(self, resolution) -> None:
        self.receiver.resolutionBegan(resolution)

    def addressResolved(self, address) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        ips = [ip_of(a) for a in self.addresses]
        allowed = set(self.guard.check(self.host, self.port, [ip for ip in ips if ip is not None]))
        for address, ip in zip(self.addresses, ips, strict=True):
            if ip in allowed:
                self.receiver.addressResolved(address)
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class GuardedResolver:
    """The reactor's name resolver, passing on only the addresses the guard permits: checked for the
    very connection that will use them, so a hostname that rebinds is caught."""

    def __init__(self, reactor, guard: AddressGuard):
        self.reactor, self.guard = reactor, guard
        self.original = reactor.nameResolver

    def install_on_reactor(self) -> None:
        self.reactor.installNameResolver(self)

    def resolveHostName(self, resolutionReceiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        return self.original.resolveHostName(_Filter(resolutionReceiver, self.guard, hostName, portNumber),
                                             hostName, portNumber, addressTypes, transportSemantics)


def resolver_factory(guard: AddressGuard):
    """A TWISTED_DNS_RESOLVER for Scrapy that builds the guarded resolver for its reactor (a plain
    function: Scrapy's settings copy their values, and a function is copied as itself)."""
    def build(reactor):
        return GuardedResolver(reactor, guard)
    return build


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self):
        self.done: Deferred = Deferred()
        self.found: list = []

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self.found.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


class AddressGuardMiddleware:
    """Refuses a request whose host resolves only to addresses the guard refuses, before anything is
    sent (robots.txt included); the connection itself is checked again by the resolver."""

    def __init__(self, crawler):
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    async def process_request(self, request):
        from twisted.internet import reactor

        guard = self.crawler.spider.guard
        host, port = url_host_port(request.url)
        key = (host.lower(), port)
        guard.refusals.pop(key, None)
        collect = _Collect()
        reactor.nameResolver.resolveHostName(collect, host, port)
        found = await maybe_deferred_to_future(collect.done)
        if not found and key in guard.refusals:
            raise RefusedAddress(f"refused: {guard.refusals[key]}")
