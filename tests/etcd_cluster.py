"""A real multi-member etcd cluster on loopback, for tests of etcd failover.

Each member runs from the same ``etcd`` binary as ``EtcdProcess``, in its own data directory
under ``base``, with its own client and peer ports on 127.0.0.1. The leader is asked of the
members themselves: etcd's v3 maintenance Status (through its JSON gateway on the client URL)
says which member answered and which one it follows.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any

from tests.daemons import stop_server

__all__ = ["EtcdCluster"]


class EtcdCluster:
    """``size`` etcd members on loopback. ``start()`` returns once a leader is elected;
    ``kill(i)`` SIGKILLs member ``i``, ``restart(i)`` brings it back on its data directory
    (same name, ports and identity, so it rejoins as itself); ``stop()`` ends them all."""

    def __init__(self, base: Path, size: int = 3) -> None:
        from tests.conftest import free_port, require_tool

        self.binary = require_tool("etcd")
        self.base = base
        self.size = size
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self.token = f"mows-test-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size

    # -- addresses --------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def data_dir(self, i: int) -> Path:
        return self.base / f"etcd-{self.names[i]}"

    def log_path(self, i: int) -> Path:
        return self.base / f"etcd-{self.names[i]}.log"

    def log(self, i: int) -> str:
        path = self.log_path(i)
        return path.read_text(errors="replace") if path.exists() else ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member (they need each other for a quorum) and wait for a leader."""
        try:
            for i in range(self.size):
                self._spawn(i)
            deadline = time.monotonic() + timeout
            for i in range(self.size):
                self._wait_port(i, deadline)
            self.leader(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> None:
        peers = ",".join(
            f"{name}=http://127.0.0.1:{port}"
            for name, port in zip(self.names, self.peer_ports, strict=True)
        )
        client = self.endpoints[i]
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        self._logs[i] = open(self.log_path(i), "ab")  # noqa: SIM115 - closed in kill()/stop()
        self.procs[i] = subprocess.Popen(
            [
                self.binary,
                "--name",
                self.names[i],
                "--data-dir",
                str(self.data_dir(i)),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                peers,
                "--initial-cluster-token",
                self.token,
                # "new" the first time; a member restarted on its data directory ignores it
                "--initial-cluster-state",
                "new",
            ],
            stdout=self._logs[i],
            stderr=subprocess.STDOUT,
        )

    def _wait_port(self, i: int, deadline: float) -> None:
        proc = self.procs[i]
        assert proc is not None
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.client_ports[i]), timeout=0.2).close()
                return
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {i} exited ({proc.returncode}):\n{self.log(i)[-3000:]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd member {i} did not listen:\n{self.log(i)[-3000:]}"
                    ) from None
                time.sleep(0.05)

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``: no goodbye to its peers, as when its machine dies."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.procs[i] = None
        self._close_log(i)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start member ``i`` again on its data directory; return once it follows a leader."""
        self.kill(i)
        self._spawn(i)
        deadline = time.monotonic() + timeout
        self._wait_port(i, deadline)
        while True:
            st = self.member_status(i)
            if st is not None and st[1] != "0":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd member {i} has no leader:\n{self.log(i)[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for i in range(self.size):
            stop_server(self.procs[i], None)
            self.procs[i] = None
            self._close_log(i)

    def _close_log(self, i: int) -> None:
        log = self._logs[i]
        if log is not None:
            log.close()
        self._logs[i] = None

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- who leads --------------------------------------------------------------------------
    def member_status(self, i: int, timeout: float = 2.0) -> tuple[str, str] | None:
        """(the answering member's id, the leader's id) from member ``i``'s v3 maintenance
        Status, ids as etcd's JSON writes them (decimal strings; "0": no leader); None if
        the member does not answer."""
        if not self.alive(i):
            return None
        req = urllib.request.Request(
            f"{self.endpoints[i]}/v3/maintenance/status",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body: dict[str, Any] = json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None
        member = str(body.get("header", {}).get("member_id", ""))
        return (member, str(body.get("leader", "0"))) if member else None

    def leader(self, timeout: float = 15.0) -> int:
        """The index of the current leader: the live member whose own Status names itself
        leader, with every other answering member agreeing. Waits for an election."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = {i: self.member_status(i) for i in range(self.size)}
            answered = {i: st for i, st in statuses.items() if st is not None}
            leaders = {st[1] for st in answered.values()}
            selves = [i for i, st in answered.items() if st[0] == st[1]]
            if len(selves) == 1 and len(leaders) == 1:
                return selves[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agreed etcd leader in {timeout}s: {statuses}")
            time.sleep(0.1)
