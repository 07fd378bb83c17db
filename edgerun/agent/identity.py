"""Who this machine is: its node id and the discovery facts catalog.

Everything is read from /sys and /proc under `root`, so tests can point it at
a tree of their own; nothing here needs more than the standard library.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from typing import Any

from edgerun.protocol import normalise_node_id

# Placeholder UUIDs that firmware ships on many boards; useless as identities.
_BOGUS_UUIDS = {
    "", "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009", "00020003-0004-0005-0006-000700080009",
}
_DMI_FILES = {"product_uuid": "product_uuid", "serial": "product_serial",
              "vendor": "sys_vendor", "product": "product_name"}
_SIOCGIFADDR, _SIOCGIFNETMASK = 0x8915, 0x891B


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def dmi(root: str = "/") -> dict[str, str]:
    out = {}
    for key, name in _DMI_FILES.items():
        value = _read(_join(root, f"/sys/class/dmi/id/{name}"))
        if value:
            out[key] = value
    return out


def macs(root: str = "/") -> dict[str, str]:
    """Interface name -> MAC of every interface but loopback, physical ones first."""
    net = _join(root, "/sys/class/net")
    try:
        names = sorted(os.listdir(net))
    except OSError:
        return {}
    found: list[tuple[bool, str, str]] = []
    for name in names:
        mac = (_read(os.path.join(net, name, "address")) or "").lower()
        if name == "lo" or not mac or mac == "00:00:00:00:00:00" or len(mac) != 17:
            continue
        physical = os.path.exists(os.path.join(net, name, "device"))
        found.append((not physical, name, mac))
    return {name: mac for _, name, mac in sorted(found)}


def derive_node_id(root: str = "/") -> str:
    """DMI product UUID, else the first non-loopback MAC, else the host name."""
    uuid = (_read(_join(root, "/sys/class/dmi/id/product_uuid")) or "").lower()
    if uuid not in _BOGUS_UUIDS and normalise_node_id(uuid):
        return normalise_node_id(uuid)
    for mac in macs(root).values():
        if normalise_node_id(mac):
            return normalise_node_id(mac)
    return normalise_node_id(os.uname().nodename) or "unknown"


def _ipv4(name: str) -> list[str]:
    packed = struct.pack("256s", name.encode()[:15])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            addr = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, packed)[20:24]
            mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, packed)[20:24]
    except OSError:
        return []
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{socket.inet_ntoa(mask)}").prefixlen
    return [f"{socket.inet_ntoa(addr)}/{prefix}"]


def _ipv6(root: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    text = _read(_join(root, "/proc/net/if_inet6")) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6 or parts[5] == "lo":
            continue
        addr = ipaddress.IPv6Address(int(parts[0], 16))
        out.setdefault(parts[5], []).append(f"{addr}/{int(parts[2], 16)}")
    return out


def ips(root: str = "/") -> dict[str, list[str]]:
    """Interface name -> its addresses with prefix length, loopback left out."""
    net = _join(root, "/sys/class/net")
    try:
        names = sorted(n for n in os.listdir(net) if n != "lo")
    except OSError:
        names = []
    v6 = _ipv6(root)
    out = {}
    for name in names:
        addresses = _ipv4(name) + v6.get(name, [])
        if addresses:
            out[name] = addresses
    return out


_RTF_UP, _RTF_REJECT = 0x1, 0x200


def default_route(root: str = "/") -> bool:
    """Whether an IPv4 or IPv6 default route is up: the network can reach beyond the
    local link (the discovery image's DHCP hook adds it last, once DNS is set)."""
    for line in (_read(_join(root, "/proc/net/route")) or "").splitlines()[1:]:
        parts = line.split()  # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if len(parts) >= 8 and parts[1] == "00000000" and parts[7] == "00000000" and \
                _hex(parts[3]) & _RTF_UP:
            return True
    for line in (_read(_join(root, "/proc/net/ipv6_route")) or "").splitlines():
        parts = line.split()  # dest plen src plen next-hop metric refcnt use flags iface
        if len(parts) == 10 and parts[1] == "00" and parts[0] == "0" * 32 and \
                parts[9] != "lo" and _hex(parts[8]) & (_RTF_UP | _RTF_REJECT) == _RTF_UP:
            return True
    return False


def _hex(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return 0


def mem_bytes(root: str = "/") -> int | None:
    for line in (_read(_join(root, "/proc/meminfo")) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def facts(root: str = "/") -> dict[str, Any]:
    """The discovery catalog of the status message (PROTOCOL.md, "status")."""
    uname = os.uname()
    out: dict[str, Any] = {
        "hostname": uname.nodename, "kernel": uname.release, "kernel_version": uname.version,
        "arch": uname.machine, "macs": macs(root), "ips": ips(root),
        "cpus": os.cpu_count(), "mem_bytes": mem_bytes(root),
    }
    found = dmi(root)
    if found:
        out["dmi"] = found
    return out
