"""Network namespaces joined by a bridge: one host per namespace, as separate machines would be.

Only addresses inside namespaces the test creates are used; nothing is routed to any other network.
Everything is removed when the block ends, also when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

import pytest

SUBNET = "10.77.0"
"""A /24 that exists only on the bridge inside the test's own namespaces."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


class Hosts:
    """`with Hosts("coordinator", "site-a", ...) as hosts:` one namespace per name; the first holds the bridge.

    hosts.address(name) is that host's address, hosts.exec(name) the argv prefix that runs a program there.
    """

    def __init__(self, *names: str) -> None:
        self._tag = f"fedlora-{os.getpid()}"
        self.names = names
        self._made: list[str] = []

    def namespace(self, name: str) -> str:
        return f"{self._tag}-{self.names.index(name)}"

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def exec(self, name: str) -> Sequence[str]:
        return ["ip", "netns", "exec", self.namespace(name)]

    def _must(self, *args: str) -> None:
        result = _ip(*args)
        if result.returncode != 0:
            self.__exit__(None, None, None)
            pytest.fail(
                f"network namespaces cannot be set up here (`ip {' '.join(args)}`: {result.stderr.strip()}); "
                "this test needs root and iproute2 (`make system-tools`)"
            )

    def __enter__(self) -> Hosts:
        if shutil.which("ip") is None:
            pytest.fail("`ip` (iproute2) is not installed: `make system-tools` installs it")
        for name in self.names:
            self._must("netns", "add", self.namespace(name))
            self._made.append(self.namespace(name))
            self._must("-n", self.namespace(name), "link", "set", "lo", "up")
        hub = self.namespace(self.names[0])
        self._must("-n", hub, "link", "add", "br0", "type", "bridge")
        self._must("-n", hub, "addr", "add", f"{self.address(self.names[0])}/24", "dev", "br0")
        self._must("-n", hub, "link", "set", "br0", "up")
        for index, name in enumerate(self.names[1:], start=1):
            leaf = self.namespace(name)
            self._must("-n", hub, "link", "add", f"port{index}", "type", "veth", "peer", "name", "eth0", "netns", leaf)
            self._must("-n", hub, "link", "set", f"port{index}", "master", "br0", "up")
            self._must("-n", leaf, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            self._must("-n", leaf, "link", "set", "eth0", "up")
        return self

    def exists(self) -> list[str]:
        listed = {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}
        return [ns for ns in (self.namespace(n) for n in self.names) if ns in listed]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        while self._made:
            _ip("netns", "del", self._made.pop())
