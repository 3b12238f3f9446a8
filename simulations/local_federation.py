"""A whole Flower deployment on one machine: a SuperLink and N SuperNodes as real processes on loopback.

For people trying the device path without devices (`fedge federation up --devices 3`) and for the
deployment tests. Everything a real deployment has is here: TLS on the SuperLink (certificates from
`fedge.protocol.tls.create_certificates`), SuperNode authentication with one registered key per
device (`--enable-supernode-auth`, `flwr supernode register`), each device's own data folder named
in its node config, its own ports, a private FLWR_HOME holding the `flwr` connection, and no runtime
dependency installation (the installed `fedge` is the app's dependency). Processes are stopped by
pid, with the helpers Flower starts for them (SuperExec, ServerApp and ClientApp processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "fedge-local"


def write_app(out: str | Path, clientapp: str = "") -> Path:
    """A copy of the Flower app folder in `out` (its pyproject.toml; `clientapp` swaps the devices' app)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = (APP_DIR / "pyproject.toml").read_text()
    if clientapp:
        text = text.replace('clientapp = "fedge.edge.federated_client:app"', f'clientapp = "{clientapp}"')
    (out / "pyproject.toml").write_text(text)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class FederationSpec:
    workdir: Path
    devices: int = 3
    data: str = "stdlib"  # split into one local file per device (partition below)...
    partition: str = "natural"
    device_data: list[str] = field(default_factory=list)  # ...or each device's own source
    host: str = "127.0.0.1"
    port: int = 0  # the SuperLink's (0: a free one)
    tls: bool = True
    auth: bool = True
    warm: bool = True  # ClientApp processes forked warm (fedge.edge.warm_superexec), not fresh interpreters
    # with `warm`: the base model each device's SuperExec loads once, before its first fork ("" = none)
    preload_model: str = ""
    preload_client_model: str = "draft"  # or "target" (with a draft, the target is preloaded too)
    # fedge.edge.supernode's idle poll (Flower 1.41's flower-supernode: a fixed 3 s; 0 = that one)
    poll_interval: float = 0.25
    heartbeat_interval: float | None = None  # seconds (10 to 1800); None = Flower's 30
    seed: int = 0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()


def split_device_data(spec: FederationSpec) -> list[str]:
    """Each device's data source: its own, or its partition of `spec.data` written to its folder."""
    if spec.device_data:
        if len(spec.device_data) != spec.devices:
            raise ValueError(f"{len(spec.device_data)} data sources for {spec.devices} devices")
        return list(spec.device_data)
    from fedge.data import load_corpus

    corpus = load_corpus(spec.data, spec.partition, num_clients=spec.devices, seed=spec.seed)
    if len(corpus.clients) < spec.devices:
        raise ValueError(f"{spec.data} ({spec.partition}) gives {len(corpus.clients)} partitions, "
                         f"not {spec.devices}")
    sources = []
    for i, client in enumerate(corpus.clients[:spec.devices]):
        path = spec.workdir / f"device-{i}" / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for ex in client.train + client.heldout:
                row = {"prompt": ex.prompt, "response": ex.text} if ex.prompt else {"text": ex.text}
                f.write(json.dumps({**row, "group": ex.group}) + "\n")
        sources.append(f"jsonl:{path}")
    return sources


class LocalFederation:
    """A SuperLink and SuperNodes on loopback; `stop()` (or leaving the `with`) ends every process."""

    def __init__(self, spec: FederationSpec) -> None:
        self.spec = spec
        self.workdir = spec.workdir
        self.port = spec.port or free_port(spec.host)
        self.address = f"{spec.host}:{self.port}"
        self.flwr_home = self.workdir / "flwr-home"
        self.certs = None
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.executors: dict[str, subprocess.Popen] = {}  # warm SuperExecs, one per SuperNode
        self.data: dict[str, str] = {}
        self.node_ids: dict[str, int] = {}
        self._helpers: set[int] = set()

    # ------------------------------------------------------------------ processes

    @property
    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # flower-superexec etc. beside this interpreter
        env = {**os.environ, "FLWR_HOME": str(self.flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        # no usage reports from a local federation (Flower's telemetry: a thread and a wait at every exit)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        # SuperExec (on the SuperLink and each SuperNode) looks for work every second by default
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        return env

    def _spawn(self, cmd: list[str], log_name: str, **env: str) -> subprocess.Popen:
        log = (self.workdir / "logs" / log_name).open("ab")
        return subprocess.Popen(cmd, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def device_ids(self) -> list[str]:
        return [f"device-{i}" for i in range(self.spec.devices)]

    def start(self) -> LocalFederation:
        from fedge.protocol.tls import create_certificates

        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.certs = create_certificates(self.workdir / "certs", devices=[*self.device_ids(), "spare", "unregistered"],
                                         hosts=[self.spec.host, "localhost"])
        self._write_connection()
        self.start_superlink()
        for device_id, source in zip(self.device_ids(), split_device_data(self.spec), strict=True):
            self.data[device_id] = source
            if self.spec.auth:
                self.register(device_id)
            self.start_node(device_id)
        return self

    def start_superlink(self) -> None:
        spec = self.spec
        cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", spec.host, "--port", str(self.port),
               "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if spec.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key)]
        else:
            cmd.append("--insecure")
        if spec.auth:
            cmd.append("--enable-supernode-auth")
        # its SuperExec starts only ServerApps (one per run): it need not poll the SuperLink 5 times a second
        self.superlink = self._spawn(cmd, "superlink.log", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.5")
        self._flwr_json(["supernode", "ls"], timeout=120)  # up once it answers

    def node_command(self, device_id: str, data: str, port: int) -> list[str]:
        """The SuperNode's command line; `port` is its Runtime API's (where its SuperExec connects)."""
        spec = self.spec
        if spec.poll_interval or spec.heartbeat_interval:  # Flower's SuperNode with these intervals
            cmd = [sys.executable, "-m", "fedge.edge.supernode", "--poll-interval", str(spec.poll_interval or 3)]
            if spec.heartbeat_interval:
                cmd += ["--heartbeat-interval", str(spec.heartbeat_interval)]
        else:
            cmd = [str(Path(sys.executable).parent / "flower-supernode")]
        cmd += ["--superlink", self.address, "--port", str(port),
                "--node-config", f'data="{data}" client="{device_id}"']
        cmd += ["--root-certificates", str(self.certs.ca_cert)] if spec.tls else ["--insecure"]
        if spec.auth:
            cmd += ["--auth-supernode-private-key", str(self.certs.supernode_key(device_id))]
        if spec.warm:  # the node's SuperExec is ours (fedge.edge.warm_superexec), started beside it
            cmd += ["--isolation", "process"]
        return cmd

    def start_node(self, device_id: str, data: str | None = None, max_retries: int | None = None) -> subprocess.Popen:
        port = free_port(self.spec.host)
        cmd = self.node_command(device_id, data or self.data[device_id], port)
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        node = self.nodes[device_id] = self._spawn(cmd, f"{device_id}.log")
        if self.spec.warm:
            node_config = cmd[cmd.index("--node-config") + 1]
            self.executors[device_id] = self._spawn(self.executor_command(port, node_config), f"{device_id}.log")
        return node

    def executor_command(self, port: int, node_config: str) -> list[str]:
        """The device's warm SuperExec (no --parent-pid: its watcher thread must not be forked), which reads
        the device's data (its node config) and, with `preload_model`, loads its model before forking."""
        spec = self.spec
        cmd = [sys.executable, "-m", "fedge.edge.warm_superexec", "--runtime-api-address", f"{spec.host}:{port}",
               "--insecure", "--preload-node-config", node_config]
        if spec.preload_model:
            cmd += ["--preload-model", spec.preload_model, "--preload-client-model", spec.preload_client_model]
        return cmd

    def register(self, device_id: str) -> int:
        out = self._flwr_json(["supernode", "register", str(self.certs.supernode_public_key(device_id))], timeout=60)
        self.node_ids[device_id] = int(out["node-id"])
        return self.node_ids[device_id]

    def node_status(self) -> dict[int, str]:
        """node id -> "online", "offline", ... as the SuperLink sees them."""
        return {int(n["node-id"]): str(n["status"]) for n in self._flwr_json(["supernode", "ls"], timeout=60)["nodes"]}

    def wait_node_status(self, device_id: str, status: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.node_status().get(self.node_ids[device_id]) != status:
            if time.time() > deadline:
                raise TimeoutError(f"{device_id} not {status} after {timeout:g} s")
            time.sleep(3.0)

    def kill_node(self, device_id: str, sig: int = signal.SIGKILL) -> None:
        """The SuperNode and its SuperExec, with the ClientApp processes they started."""
        procs = [self.nodes.pop(device_id)]
        if device_id in self.executors:
            procs.insert(0, self.executors.pop(device_id))
        self._kill_trees(procs, sig)

    def restart_node(self, device_id: str, timeout: float = 240.0) -> subprocess.Popen:
        """Start a killed device again once the SuperLink has let its old session lapse (a SIGKILLed
        SuperNode stays "online" until its heartbeats are overdue; until then a new one is refused)."""
        self.wait_node_status(device_id, "offline", timeout)
        return self.start_node(device_id)

    def restart_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Kill the SuperLink (with the ServerApp it runs) and start it again on the same port and
        database: registrations persist and the SuperNodes reconnect by themselves."""
        self._kill_trees([self.superlink], sig)
        self.start_superlink()

    def stop(self) -> None:
        """Every device at once, then the SuperLink (each waits for its own exit: seconds)."""
        devices = [*self.executors.values(), *self.nodes.values()]
        self.executors.clear()
        self.nodes.clear()
        self._kill_trees(devices, signal.SIGTERM)
        if self.superlink is not None:
            self._kill_trees([self.superlink], signal.SIGTERM)
            self.superlink = None
        for pid in list(self._helpers):  # helpers that outlived their parent
            _signal(pid, signal.SIGKILL)
        self._helpers.clear()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _kill_trees(self, procs: list[subprocess.Popen], sig: int) -> None:
        """`procs` and the processes Flower started under them (their own sessions), by pid: all are
        signalled first, then each is waited for (SIGKILL after 15 s)."""
        import psutil

        children: list[int] = []
        for proc in procs:
            try:
                children += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        self._helpers.update(children)
        for proc in procs:
            _signal(proc.pid, sig)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in children:
            _signal(pid, signal.SIGKILL if sig == signal.SIGKILL else sig)

    # ------------------------------------------------------------------ the `flwr` side

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append(f'root-certificates = "{self.certs.ca_cert}"' if self.spec.tls else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _flwr_json(self, args: list[str], timeout: float) -> dict:
        """`flwr ARGS CONNECTION --format json`, retried until it succeeds or `timeout` passes."""
        flwr = str(Path(sys.executable).parent / "flwr")
        deadline, last = time.time() + timeout, ""
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.workdir / 'logs' / 'superlink.log'}")
            done = subprocess.run([flwr, *args, CONNECTION, "--format", "json"], env=self.env, capture_output=True,
                                  text=True, timeout=120)
            try:
                out = json.loads(done.stdout[done.stdout.index("{"):])
                if out.get("success"):
                    return out
                last = str(out)
            except ValueError:
                last = done.stdout[-500:] + done.stderr[-500:]
            if time.time() > deadline:  # timeout 0: a single try (e.g. `flwr run`, not to start two runs)
                break
            time.sleep(1.0)
        raise RuntimeError(f"flwr {' '.join(args)} failed: {last}")

    def run_command(self, run_config: dict | None = None, app_dir: Path = APP_DIR) -> list[str]:
        """The `flwr run` line for this federation (run config values as TOML)."""
        cmd = ["flwr", "run", str(app_dir), CONNECTION]
        if run_config:  # one --run-config: flwr 1.41 keeps only the last of several
            cmd += ["--run-config", " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())]
        return cmd

    def submit(self, run_config: dict | None = None, app_dir: Path = APP_DIR) -> int:
        """Start a run; returns its run id."""
        args = self.run_command(run_config, app_dir)[1:]
        args.remove(CONNECTION)  # _flwr_json names the connection
        return int(self._flwr_json(args, timeout=0)["run-id"])

    def stop_run(self, run_id: int) -> None:
        """`flwr stop`: e.g. a run whose ServerApp died with the SuperLink (the restarted SuperLink still
        lists it as running until its ServerApp's heartbeats lapse, and devices keep pulling its messages)."""
        self._flwr_json(["stop", str(run_id)], timeout=60)

    def run_status(self, run_id: int) -> str:
        out = self._flwr_json(["ls", "--run-id", str(run_id)], timeout=60)
        return str(out["runs"][0]["status"])

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log, as `flwr log --show` prints it (for failure messages)."""
        flwr = str(Path(sys.executable).parent / "flwr")
        done = subprocess.run([flwr, "log", str(run_id), CONNECTION, "--show"], env=self.env, capture_output=True,
                              text=True, timeout=120)
        return done.stdout + done.stderr

    def wait_run(self, run_id: int, timeout: float, check_every_s: float = 20.0) -> str:
        """Wait until the run is finished; its status (e.g. "finished:completed").

        Each `flwr ls` is a Python process start (seconds of CPU on a small machine), so this watches
        the SuperLink's log for the end of the run's ServerApp task and asks `flwr ls` then, or every
        `check_every_s` in case the line never comes."""
        deadline, status, ended = time.time() + timeout, "unknown", re.compile(rf"Finished task \d+ of run {run_id}\b")
        log, offset, tail, check_at = self.workdir / "logs" / "superlink.log", 0, "", time.time() + check_every_s
        while time.time() < deadline:
            with log.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            tail = tail[-200:] + chunk.decode(errors="replace")  # a line may span two reads
            if ended.search(tail) or time.time() >= check_at:
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    return status
                check_at = time.time() + check_every_s
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} not finished after {timeout:g} s (status {status})")

def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
