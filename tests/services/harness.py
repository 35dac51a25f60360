"""Start, watch and stop the real services on loopback: Kubo, 3 NATS JetStream nodes, Redis.

Used three ways: by ``scripts/test.sh`` (``python -m tests.services.harness start|stop|status
--dir DIR``), by the pytest session fixture ``services`` (tests/conftest.py), and by fault tests
that stop and restart single NATS nodes. Binaries come from ``scripts/install-services.sh``
(``~/.cache/alliance-gateway/bin``). Ports are fixed, non-default and loopback-only, so nothing
else on the machine is disturbed; every process started is recorded in a pid file and stopped by
``stop``. A service that does not come up fails loudly with the tail of its own log.

Ports (127.0.0.1 only; all shifted by ``--port-offset`` / ``GATEWAY_SERVICES_PORT_OFFSET``):
Kubo RPC 15001, Kubo swarm 15002 (no HTTP gateway, no bootstrap, ``daemon --offline``);
NATS clients 14222-14224, cluster routes 16222-16224, monitoring 18222-18224 (nodes n1..n3,
``jetstream { sync_interval: always }``); Redis 16379 (``appendonly yes``, ``appendfsync always``);
PostgreSQL 15432 (the production search index: its own cluster, initdb into the services
directory, trust authentication on loopback TCP only, no Unix socket, database ``gateway``, run
as the OS user ``postgres`` when the harness runs as root).
Health: Kubo ``POST /api/v0/id``; NATS ``/healthz`` per node, a JetStream meta leader with two
peers, and a 3-replica probe stream (``HARNESS_PROBE``) with a leader and two current replicas;
Redis ``PING``; PostgreSQL a connection (creating the ``gateway`` database). State lives under
the directory given (default ``<repo>/.services``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("GATEWAY_TOOLS_DIR", Path.home() / ".cache/alliance-gateway/bin"))

KUBO_API_PORT = 15001
KUBO_SWARM_PORT = 15002
NATS_CLIENT_PORTS = (14222, 14223, 14224)
NATS_CLUSTER_PORTS = (16222, 16223, 16224)
NATS_MONITOR_PORTS = (18222, 18223, 18224)
REDIS_PORT = 16379
POSTGRES_PORT = 15432
NODES = ("n1", "n2", "n3")
PROBE_STREAM = "HARNESS_PROBE"


class ServiceError(RuntimeError):
    """A service did not start or stop; the message carries the tail of its log."""


def _bin(name: str) -> str:
    candidate = BIN_DIR / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name} not found: run scripts/install-services.sh first")
    return found


def _postgres_bin() -> Path:
    """The directory of the PostgreSQL server binaries (Debian: /usr/lib/postgresql/<v>/bin)."""
    linked = BIN_DIR / "postgres"
    if linked.exists():
        return linked.resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise ServiceError("postgres not found: run scripts/install-services.sh first")
    return Path(on_path).resolve().parent


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# Children started by this process, by pid file. Module-level, not per Services object, so a
# running child's Popen is never garbage-collected (which would warn) while it runs.
_CHILDREN: dict[Path, subprocess.Popen[bytes]] = {}


def _set_sync(spec: dict[str, object]) -> None:
    """Set ``sync: true`` on every flatfs datastore in a Kubo datastore spec."""
    if spec.get("type") == "flatfs":
        spec["sync"] = True
    mounts = spec.get("mounts")
    for child in mounts if isinstance(mounts, list) else []:
        if isinstance(child, dict):
            inner = child.get("child", child)
            _set_sync(inner if isinstance(inner, dict) else child)


@dataclass
class Services:
    """Addresses of the running services and control over their processes."""

    directory: Path
    port_offset: int = 0  # added to every port, so a second set can run beside the first
    kubo_url: str = ""
    nats_urls: list[str] = field(default_factory=list)
    redis_url: str = ""
    postgres_url: str = ""

    def __post_init__(self) -> None:
        o = self.port_offset
        self.kubo_url = self.kubo_url or f"http://127.0.0.1:{KUBO_API_PORT + o}"
        self.nats_urls = self.nats_urls or [f"nats://127.0.0.1:{p + o}" for p in NATS_CLIENT_PORTS]
        self.redis_url = self.redis_url or f"redis://127.0.0.1:{REDIS_PORT + o}/0"
        self.postgres_url = (
            self.postgres_url or f"postgresql://gateway@127.0.0.1:{POSTGRES_PORT + o}/gateway"
        )

    def port(self, base: int) -> int:
        """The port this set of services uses for the documented ``base`` port."""
        return base + self.port_offset

    # -- process bookkeeping -----------------------------------------------------------------

    def _pidfile(self, name: str) -> Path:
        return self.directory / "pids" / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.directory / "logs" / f"{name}.log"

    def _spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> int:
        self._log(name).parent.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with self._log(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                # as that user entirely: its own group, not root's (whose bits would apply)
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
            )
        self._pidfile(name).write_text(str(proc.pid))
        _CHILDREN[self._pidfile(name)] = proc  # kept so the child is reaped (no zombie)
        return proc.pid

    def pid(self, name: str) -> int | None:
        """The pid of a running service process, or None."""
        try:
            pid = int(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return None
        proc = _CHILDREN.get(self._pidfile(name))
        if proc is not None and proc.pid == pid:
            return pid if proc.poll() is None else None  # our child: a zombie is not running
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        pid = self.pid(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        proc = _CHILDREN.get(self._pidfile(name))
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            _CHILDREN.pop(self._pidfile(name), None)
            self._pidfile(name).unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
                if waited == pid:
                    break
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._pidfile(name).unlink(missing_ok=True)

    # -- Kubo ------------------------------------------------------------------------------

    def start_kubo(self) -> None:
        """Initialise (once) and start Kubo; wait for its RPC ``id``."""
        repo = self.directory / "kubo"
        env = {"IPFS_PATH": str(repo)}
        ipfs = _bin("ipfs")
        if not (repo / "config").exists():
            repo.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [ipfs, "init", "--profile=test", "--empty-repo"],
                env={**os.environ, **env},
                check=True,
                capture_output=True,
            )
            for key, value in (
                ("Addresses.API", f"/ip4/127.0.0.1/tcp/{self.port(KUBO_API_PORT)}"),
                ("Addresses.Gateway", "[]"),
                ("Addresses.Swarm", f'["/ip4/127.0.0.1/tcp/{self.port(KUBO_SWARM_PORT)}"]'),
                ("Bootstrap", "[]"),
            ):
                subprocess.run(
                    [
                        ipfs,
                        "config",
                        "--json",
                        key,
                        json.dumps(value) if key == "Addresses.API" else value,
                    ],
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                )
            # The test profile turns flatfs fsync off; an acknowledged block must be on disk.
            config_path = repo / "config"
            config = json.loads(config_path.read_text())
            _set_sync(config["Datastore"]["Spec"])
            config_path.write_text(json.dumps(config, indent=2))
        self._spawn("kubo", [ipfs, "daemon", "--offline"], env)
        self._wait("kubo", self._kubo_ready, 60)

    def _kubo_ready(self) -> bool:
        try:
            return httpx.post(f"{self.kubo_url}/api/v0/id", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    # -- NATS ------------------------------------------------------------------------------

    def _nats_conf(self, i: int) -> Path:
        name = NODES[i]
        store = self.directory / "nats" / name
        store.mkdir(parents=True, exist_ok=True)
        routes = ",".join(
            f"nats-route://127.0.0.1:{self.port(p)}"
            for j, p in enumerate(NATS_CLUSTER_PORTS)
            if j != i
        )
        conf = self.directory / "nats" / f"{name}.conf"
        conf.write_text(
            f"""server_name: {name}
listen: 127.0.0.1:{self.port(NATS_CLIENT_PORTS[i])}
max_payload: 8MB
http: 127.0.0.1:{self.port(NATS_MONITOR_PORTS[i])}
jetstream {{
  store_dir: "{store}"
  sync_interval: always
  max_memory_store: 256MB
  max_file_store: 8GB
}}
cluster {{
  name: alliance
  listen: 127.0.0.1:{self.port(NATS_CLUSTER_PORTS[i])}
  routes: [{routes}]
}}
"""
        )
        return conf

    def start_node(self, name: str) -> None:
        """Start one NATS node (n1, n2, n3) and wait until it serves clients."""
        i = NODES.index(name)
        self._spawn(f"nats-{name}", [_bin("nats-server"), "-c", str(self._nats_conf(i))])
        self._wait(f"nats-{name}", lambda: self._nats_healthy(i), 30)

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one NATS node (SIGKILL to crash it)."""
        self._stop(f"nats-{name}", sig)

    def _nats_healthy(self, i: int) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port(NATS_MONITOR_PORTS[i])}/healthz", timeout=2)
            return r.status_code == 200
        except httpx.TransportError:
            return False

    def start_nats(self) -> None:
        """Start the 3-node cluster; wait for a JetStream meta leader and all 3 peers."""
        for i, name in enumerate(NODES):
            self._spawn(f"nats-{name}", [_bin("nats-server"), "-c", str(self._nats_conf(i))])
        for i, name in enumerate(NODES):
            self._wait(f"nats-{name}", lambda i=i: self._nats_healthy(i), 60)  # type: ignore[misc]
        self._wait("nats-n1", self._jetstream_clustered, 60)
        self._wait("nats-n1", self._probe_stream_replicated, 60)

    def _jetstream_clustered(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port(NATS_MONITOR_PORTS[0])}/jsz", timeout=2)
            meta = r.json().get("meta_cluster", {})
            return bool(meta.get("leader")) and len(meta.get("replicas", [])) == 2
        except (httpx.TransportError, ValueError):
            return False

    def _probe_stream_replicated(self) -> bool:
        """Create (once) a 3-replica probe stream; True when it has a leader and 2 current peers.

        Runs the NATS client on its own thread and event loop, so it also works when called
        from inside a running event loop (an async pytest fixture).
        """
        result: list[bool] = []

        async def probe() -> bool:
            import nats
            from nats.js.api import StorageType, StreamConfig

            nc = await nats.connect(
                servers=self.nats_urls, connect_timeout=2, max_reconnect_attempts=1
            )
            try:
                js = nc.jetstream(timeout=5)
                try:
                    info = await js.stream_info(PROBE_STREAM)
                except Exception:
                    info = await js.add_stream(
                        StreamConfig(
                            name=PROBE_STREAM,
                            subjects=["harness.probe"],
                            storage=StorageType.FILE,
                            num_replicas=3,
                            max_msgs=10,
                        )
                    )
                await js.publish("harness.probe", b"ping", stream=PROBE_STREAM)
                info = await js.stream_info(PROBE_STREAM)
                cluster = info.cluster
                if cluster is None or not cluster.leader:
                    return False
                peers = cluster.replicas or []
                return len(peers) == 2 and all(p.current for p in peers)
            finally:
                await nc.close()

        def run() -> None:
            try:
                result.append(asyncio.run(asyncio.wait_for(probe(), 10)))
            except Exception:
                result.append(False)

        thread = threading.Thread(target=run, name="jetstream-probe")
        thread.start()
        thread.join(15)
        return bool(result and result[0])

    def jetstream_ready(self) -> bool:
        """Whether the cluster has a meta leader and a 3-replica stream with all peers current."""
        return self._jetstream_clustered() and self._probe_stream_replicated()

    def nats_stream_leader(self, stream: str) -> str | None:
        """The node name (n1, n2, n3) leading ``stream``, or None while there is none."""
        return self.stream_leader(stream)

    def stream_leader(self, stream: str) -> str | None:
        """The node name leading ``stream`` (from the monitoring endpoint), or None."""
        for i, _ in enumerate(NODES):
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{self.port(NATS_MONITOR_PORTS[i])}/jsz",
                    params={"streams": "true"},
                    timeout=2,
                )
            except httpx.TransportError:
                continue
            for account in r.json().get("account_details", []):
                for s in account.get("stream_detail", []):
                    if s.get("name") == stream and s.get("cluster", {}).get("leader"):
                        return str(s["cluster"]["leader"])
        return None

    # -- Redis -----------------------------------------------------------------------------

    def start_redis(self) -> None:
        """Start Redis (AOF, fsync always) on its own port and directory; wait for PING."""
        d = self.directory / "redis"
        d.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "redis",
            [
                _bin("redis-server"),
                "--port",
                str(self.port(REDIS_PORT)),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
        )
        self._wait("redis", self._redis_ready, 30)

    def _redis_ready(self) -> bool:
        try:
            out = subprocess.run(
                [_bin("redis-cli"), "-p", str(self.port(REDIS_PORT)), "PING"],
                capture_output=True,
                text=True,
                timeout=2,
            )
            return out.stdout.strip() == "PONG"
        except (subprocess.TimeoutExpired, ServiceError):
            return False

    def stop_redis(self) -> None:
        """Stop Redis."""
        self._stop("redis")

    # -- PostgreSQL ------------------------------------------------------------------------

    def start_postgres(self) -> None:
        """Initialise (once) and start a PostgreSQL cluster on its own port, loopback TCP only
        with trust authentication; create the ``gateway`` database; wait until it answers."""
        pg_bin = _postgres_bin()
        d = self.directory / "postgres"
        data = d / "data"
        user = "postgres" if os.geteuid() == 0 else None
        if not (data / "PG_VERSION").exists():
            d.mkdir(parents=True, exist_ok=True)
            if user is not None:
                # The postgres user must reach its directory: traverse-only on the parents.
                for parent in (self.directory, *self.directory.parents):
                    if parent == Path("/"):
                        break
                    mode = parent.stat().st_mode
                    if not mode & 0o001:
                        os.chmod(parent, mode | 0o001)
                shutil.chown(d, user, user)
            subprocess.run(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "gateway",
                    "--auth-host=trust",
                    "--auth-local=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
            )
        self._spawn(
            "postgres",
            [
                str(pg_bin / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port(POSTGRES_PORT)),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
            ],
            user=user,
        )
        self._wait("postgres", self._postgres_ready, 60)

    def _postgres_ready(self) -> bool:
        try:
            import psycopg
        except ImportError as exc:
            raise ServiceError("psycopg is not installed (pip install -e '.[dev]')") from exc
        admin = self.postgres_url.rsplit("/", 1)[0] + "/postgres"
        try:
            with psycopg.connect(admin, connect_timeout=2, autocommit=True) as conn:
                found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'gateway'")
                if found.fetchone() is None:
                    conn.execute("CREATE DATABASE gateway")
            return True
        except psycopg.Error:
            return False

    def stop_postgres(self) -> None:
        """Stop PostgreSQL (fast shutdown: SIGINT)."""
        self._stop("postgres", signal.SIGINT)

    def stop_kubo(self) -> None:
        """Stop Kubo."""
        self._stop("kubo")

    # -- all ---------------------------------------------------------------------------------

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.pid(name) is None:
                raise ServiceError(f"{name} exited while starting:\n{_tail(self._log(name))}")
            time.sleep(0.1)
        raise ServiceError(f"{name} not healthy after {timeout:.0f} s:\n{_tail(self._log(name))}")

    def start(self) -> None:
        """Start every service; stop them all again if one fails."""
        bases = [KUBO_API_PORT, KUBO_SWARM_PORT, REDIS_PORT, POSTGRES_PORT, *NATS_CLIENT_PORTS]
        bases += [*NATS_CLUSTER_PORTS, *NATS_MONITOR_PORTS]
        busy = [self.port(p) for p in bases if _port_open(self.port(p))]
        if busy:
            raise ServiceError(f"ports already in use: {busy} (services already running?)")
        try:
            self.start_redis()
            self.start_postgres()
            self.start_nats()
            self.start_kubo()
        except BaseException:
            self.stop()
            raise
        self.write_env()

    def all_running(self) -> bool:
        """Whether every service process recorded here is alive."""
        names = ["kubo", "redis", "postgres", *(f"nats-{n}" for n in NODES)]
        return all(self.pid(n) is not None for n in names)

    def stop(self) -> None:
        """Stop every process this harness started."""
        self._stop("kubo")
        for name in NODES:
            self._stop(f"nats-{name}")
        self._stop("redis")
        self._stop("postgres", signal.SIGINT)

    def write_env(self) -> Path:
        """Write the addresses as an env file for scripts and tests."""
        path = self.directory / "env"
        path.write_text(
            f"GATEWAY_KUBO_URL={self.kubo_url}\n"
            f"GATEWAY_NATS_URLS={','.join(self.nats_urls)}\n"
            f"GATEWAY_REDIS_URL={self.redis_url}\n"
            f"GATEWAY_POSTGRES_URL={self.postgres_url}\n"
            f"GATEWAY_SERVICES_DIR={self.directory}\n"
            f"GATEWAY_SERVICES_PORT_OFFSET={self.port_offset}\n"
        )
        return path

    @classmethod
    def from_env_file(cls, path: Path) -> Services:
        """Services described by an env file written by :meth:`write_env`."""
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return cls(
            directory=Path(values["GATEWAY_SERVICES_DIR"]),
            port_offset=int(values.get("GATEWAY_SERVICES_PORT_OFFSET", "0")),
            kubo_url=values["GATEWAY_KUBO_URL"],
            nats_urls=values["GATEWAY_NATS_URLS"].split(","),
            redis_url=values["GATEWAY_REDIS_URL"],
            postgres_url=values.get("GATEWAY_POSTGRES_URL", ""),
        )


@contextlib.contextmanager
def services_from_env_or_start() -> Iterator[Services]:
    """The services named by ``GATEWAY_SERVICES_ENV``, or freshly started ones (stopped after)."""
    env = os.environ.get("GATEWAY_SERVICES_ENV")
    if env:
        yield Services.from_env_file(Path(env))
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gateway-services-") as tmp:
        services = Services(directory=Path(tmp))
        services.start()
        try:
            yield services
        finally:
            services.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--dir", type=Path, default=ROOT / ".services")
    ap.add_argument(
        "--port-offset",
        type=int,
        default=int(os.environ.get("GATEWAY_SERVICES_PORT_OFFSET", "0")),
        help="added to every port (run a second set beside the first)",
    )
    args = ap.parse_args()
    services = Services(directory=args.dir.resolve(), port_offset=args.port_offset)
    if args.action == "start":
        args.dir.mkdir(parents=True, exist_ok=True)
        try:
            services.start()
        except ServiceError as exc:
            print(f"services: {exc}", file=sys.stderr)
            return 1
        print(f"services up; addresses in {services.directory / 'env'}")
    elif args.action == "stop":
        services.stop()
        print("services stopped")
    else:
        names = ["kubo", "redis", "postgres", *(f"nats-{n}" for n in NODES)]
        for name in names:
            print(
                f"{name:10} "
                f"{'running pid ' + str(services.pid(name)) if services.pid(name) else 'stopped'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
