"""Lifecycle of a local Neo4j 5.26 LTS Community server built from Maven Central jars.

The project owns its database: ``fetch_jars`` copies the server and Neo4j Browser jars with
Maven (``neo4j_dist/pom.xml``), ``start`` writes ``neo4j.conf`` and launches
``org.neo4j.server.CommunityEntryPoint`` directly as one background JVM whose pid we own,
and returns once a Bolt ``RETURN 1`` succeeds. Auth is on; the password is generated on
first start, stored in a file only the user can read, and handed to ``neo4j-admin`` through
a Java ``@argfile`` so it never appears in a process listing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from graphstore.errors import ServerError

log = logging.getLogger(__name__)

NEO4J_VERSION = "5.26.30"
ENTRY_POINT = "org.neo4j.server.CommunityEntryPoint"
ADMIN_ENTRY_POINT = "org.neo4j.server.startup.Neo4jAdminCommand"
USER = "neo4j"


def default_home() -> Path:
    """Folder for everything the project caches: ``$PATHX_HOME`` or ``./.cache``."""
    return Path(os.environ.get("PATHX_HOME", Path.cwd() / ".cache")).resolve()


@dataclass(kw_only=True, frozen=True)
class ServerConfig:
    """Where a local server lives and how it is sized.

    ``lib_dir`` holds the jars (shared between instances); ``instance_dir`` holds conf,
    data, logs, the pid file and the password file of one server.
    """

    lib_dir: Path
    instance_dir: Path
    bolt_port: int = 7687
    http_port: int = 7474
    heap_initial: str = "1g"
    heap_max: str = "2g"
    pagecache: str = "1g"
    tx_memory_max: str = "1g"
    tx_timeout: str = "120s"

    @classmethod
    def default(cls, home: Path | None = None) -> ServerConfig:
        home = home or default_home()
        return cls(lib_dir=home / "neo4j" / "lib", instance_dir=home / "neo4j" / "instance")

    def instance(self, instance_dir: Path, **sizes: str) -> ServerConfig:
        """Another server sharing these jars, in ``instance_dir`` on free ports, sized by ``sizes`` (the
        fields ``heap_initial``, ``heap_max``, ``pagecache``, ``tx_memory_max``; the defaults otherwise): a
        throwaway instance for a test or a bench."""
        return ServerConfig(lib_dir=self.lib_dir, instance_dir=instance_dir, bolt_port=free_port(),
                            http_port=free_port(), **sizes)

    @property
    def conf_dir(self) -> Path:
        return self.instance_dir / "conf"

    @property
    def log_file(self) -> Path:
        return self.instance_dir / "logs" / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.instance_dir / "run" / "pathx.pid"

    @property
    def password_file(self) -> Path:
        return self.instance_dir / "password"

    @property
    def state_file(self) -> Path:
        return self.instance_dir / "run" / "state.json"

    @property
    def bolt_uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"

    @property
    def browser_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/browser/"


@dataclass(kw_only=True, frozen=True)
class ServerStatus:
    """What ``status`` reports: running means the pid is alive and Bolt answers."""

    running: bool
    pid: int | None
    bolt_uri: str
    browser_url: str
    detail: str


def _pom_text() -> str:
    return resources.files("graphstore").joinpath("neo4j_dist/pom.xml").read_text()


def fetch_jars(config: ServerConfig) -> Path:
    """Copy the Neo4j server and Browser jars from Maven Central into ``config.lib_dir``.

    Idempotent: a marker holding the pom's hash skips the Maven run when nothing changed.
    """
    pom = _pom_text()
    digest = hashlib.sha256(pom.encode()).hexdigest()[:16]
    marker = config.lib_dir / ".pom-hash"
    if marker.exists() and marker.read_text() == digest:
        return config.lib_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServerError("Maven ('mvn') is not on PATH; it is needed once to fetch the Neo4j jars")
    tmp = config.lib_dir.with_name(config.lib_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as work:
        pom_path = Path(work) / "pom.xml"
        pom_path.write_text(pom)
        log.info("fetching Neo4j %s jars with Maven into %s", NEO4J_VERSION, config.lib_dir)
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
            capture_output=True, text=True, check=False,
        )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise ServerError("Maven could not fetch the Neo4j jars: " + " | ".join(tail))
    shutil.rmtree(config.lib_dir, ignore_errors=True)
    tmp.rename(config.lib_dir)
    marker.write_text(digest)
    return config.lib_dir


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise ServerError("Java 17 ('java') is not on PATH; Neo4j 5.26 needs it")
    return java


def _write_conf(config: ServerConfig) -> None:
    lines = [
        "server.default_listen_address=127.0.0.1",
        "server.default_advertised_address=127.0.0.1",
        f"server.bolt.listen_address=127.0.0.1:{config.bolt_port}",
        f"server.http.listen_address=127.0.0.1:{config.http_port}",
        "server.https.enabled=false",
        "dbms.security.auth_enabled=true",
        f"server.memory.heap.initial_size={config.heap_initial}",
        f"server.memory.heap.max_size={config.heap_max}",
        f"server.memory.pagecache.size={config.pagecache}",
        f"db.memory.transaction.total.max={config.tx_memory_max}",
        f"db.transaction.timeout={config.tx_timeout}",
        "dbms.usage_report.enabled=false",
        "dbms.security.allow_csv_import_from_file_urls=false",
        f"server.directories.data={config.instance_dir / 'data'}",
        f"server.directories.logs={config.instance_dir / 'logs'}",
        f"server.directories.run={config.instance_dir / 'run'}",
        f"server.directories.plugins={config.instance_dir / 'plugins'}",
        f"server.directories.import={config.instance_dir / 'import'}",
        f"server.directories.lib={config.lib_dir}",
    ]
    config.conf_dir.mkdir(parents=True, exist_ok=True)
    (config.conf_dir / "neo4j.conf").write_text("\n".join(lines) + "\n")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_password(config: ServerConfig) -> str:
    """The local server's password (file mode 0600)."""
    try:
        return config.password_file.read_text().strip()
    except FileNotFoundError as exc:
        raise ServerError(
            f"no password file at {config.password_file}; start the server once with `pathx db start`"
        ) from exc


def _classpath(config: ServerConfig) -> str:
    return os.pathsep.join(
        [f"{config.instance_dir / 'plugins'}/*", f"{config.conf_dir}/*", f"{config.lib_dir}/*"]
    )


def _set_initial_password(config: ServerConfig) -> None:
    """Generate the password and register it before the first start.

    The password reaches ``neo4j-admin`` through a Java ``@argfile`` (mode 0600, removed
    right after), so it is never visible in ``ps`` output.
    """
    password = "p" + secrets.token_urlsafe(24)  # never starts with "-", which neo4j-admin would read as an option
    config.instance_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password)
    argfile = config.instance_dir / "run" / "admin.args"
    argfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(argfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f'{ADMIN_ENTRY_POINT}\ndbms\nset-initial-password\n"{password}"\n')
    env = dict(os.environ, NEO4J_HOME=str(config.instance_dir), NEO4J_CONF=str(config.conf_dir))
    try:
        proc = subprocess.run(
            [java_executable(), "-cp", f"{config.lib_dir}/*", f"@{argfile}"],
            capture_output=True, text=True, env=env, check=False, cwd=config.instance_dir,
        )
    finally:
        argfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        config.password_file.unlink(missing_ok=True)
        raise ServerError("neo4j-admin could not set the initial password: " + proc.stderr.strip()[-300:])


def read_pid(config: ServerConfig) -> int | None:
    try:
        pid = int(config.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _bolt_ready(uri: str, password: str) -> bool:
    import neo4j  # local import: the driver is only needed once a server is up

    try:
        with neo4j.GraphDatabase.driver(uri, auth=(USER, password), connection_timeout=2.0) as drv, \
                drv.session(database="neo4j") as session:
            session.run("RETURN 1").consume()  # auto-commit: no retries, one attempt per poll
    except Exception:  # any failure means "not ready yet"; the caller times out with the log tail
        return False
    return True


def _log_tail(config: ServerConfig, lines: int = 15) -> str:
    try:
        text = config.log_file.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(text[-lines:])


def _write_state(config: ServerConfig) -> None:
    config.state_file.write_text(
        json.dumps({"bolt_port": config.bolt_port, "http_port": config.http_port})
    )


def load_state(config: ServerConfig) -> ServerConfig:
    """The config with the ports the instance was last started with (if known)."""
    try:
        state = json.loads(config.state_file.read_text())
    except (FileNotFoundError, ValueError):
        return config
    return ServerConfig(
        **{**config.__dict__, "bolt_port": state["bolt_port"], "http_port": state["http_port"]}
    )


def prepare(config: ServerConfig) -> None:
    """Jars, folders, configuration and the initial password: all a first start or an offline import
    needs, without starting the server."""
    fetch_jars(config)
    for sub in ("data", "logs", "run", "plugins", "import"):
        (config.instance_dir / sub).mkdir(parents=True, exist_ok=True)
    _write_conf(config)
    if not config.password_file.exists():
        _set_initial_password(config)


def has_database(config: ServerConfig) -> bool:
    """Whether the instance's ``neo4j`` database was ever created (by a start or an import)."""
    return (config.instance_dir / "data" / "databases" / "neo4j").is_dir()


def start(config: ServerConfig, timeout: float = 240.0) -> ServerStatus:
    """Start the server (fetching jars first if needed) and wait until Bolt answers.

    Returns at once when this instance already runs. Raises ``ServerError`` naming the port
    when a port is taken, and with the log's tail when the server does not come up.
    """
    pid = read_pid(config)
    if pid is not None:
        running = load_state(config)
        if _bolt_ready(running.bolt_uri, read_password(running)):
            return status(running)
        stop(running)
    for name, port in (("Bolt", config.bolt_port), ("HTTP", config.http_port)):
        if not _port_free(port):
            raise ServerError(
                f"{name} port {port} on 127.0.0.1 is already in use; stop what holds it or choose another port"
            )
    prepare(config)
    password = read_password(config)
    cmd = [
        java_executable(), f"-Xms{config.heap_initial}", f"-Xmx{config.heap_max}", "-XX:+UseG1GC",
        "-XX:-OmitStackTraceInFastThrow", "-Dfile.encoding=UTF-8",
        "-cp", _classpath(config), ENTRY_POINT,
        f"--home-dir={config.instance_dir}", f"--config-dir={config.conf_dir}", "--console-mode",
    ]
    env = dict(os.environ, NEO4J_HOME=str(config.instance_dir), NEO4J_CONF=str(config.conf_dir))
    config.log_file.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with open(config.log_file, "ab") as logfh:
        proc = subprocess.Popen(
            cmd, stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=config.instance_dir, start_new_session=True,
        )
    config.pid_file.write_text(str(proc.pid))
    _write_state(config)
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            config.pid_file.unlink(missing_ok=True)
            raise ServerError(
                f"Neo4j exited with code {proc.returncode} during start-up; log tail:\n{_log_tail(config)}"
            )
        if _bolt_ready(config.bolt_uri, password):
            log.info("Neo4j ready at %s after %.1f s", config.bolt_uri, time.monotonic() - began)
            return status(config)
        time.sleep(0.5)
    stop(config)
    raise ServerError(
        f"Neo4j did not answer on {config.bolt_uri} within {timeout:.0f} s; log tail:\n{_log_tail(config)}"
    )


def stop(config: ServerConfig, timeout: float = 90.0) -> bool:
    """Stop the server with SIGTERM (clean shutdown), SIGKILL after ``timeout``.

    Returns True when a process was stopped, False when none ran.
    """
    pid = read_pid(config)
    if pid is None:
        config.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                break
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        log.warning("Neo4j (pid %d) ignored SIGTERM for %.0f s; killing it", pid, timeout)
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    config.pid_file.unlink(missing_ok=True)
    return True


def status(config: ServerConfig) -> ServerStatus:
    """Whether this instance runs and answers on Bolt."""
    config = load_state(config)
    pid = read_pid(config)
    if pid is None:
        return ServerStatus(running=False, pid=None, bolt_uri=config.bolt_uri, browser_url=config.browser_url,
                            detail="not running")
    try:
        ok = _bolt_ready(config.bolt_uri, read_password(config))
    except ServerError as exc:
        return ServerStatus(running=False, pid=pid, bolt_uri=config.bolt_uri, browser_url=config.browser_url,
                            detail=str(exc))
    detail = "running" if ok else "process alive but Bolt does not answer yet"
    return ServerStatus(running=ok, pid=pid, bolt_uri=config.bolt_uri, browser_url=config.browser_url, detail=detail)
