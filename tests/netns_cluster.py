"""A multi-"host" Ray cluster on one machine: each host is a Linux network namespace with its own IP.

`NetnsCluster(n)` creates a bridge `{prefix}-br0` ({subnet}.1/24) in the root namespace and, per host
i, a namespace `{prefix}-h{i}` joined to the bridge by a veth pair, with address {subnet}.{i+2}/24.
It then starts a Ray head inside host 0 and a Ray worker node inside every other host, each
started with `--node-ip-address` = that host's IP, so Ray sees n nodes with n addresses, and a
peer's 127.0.0.1 or abstract unix sockets are really out of reach (what makes a multi-host test
honest). Needs root (`ip netns`). Everything it starts is stopped by PID (`ip netns pids`), never
by name: `ray stop` would kill every Ray on the machine.

Used by tests (`from netns_cluster import NetnsCluster, can_create_namespaces`) and as a script:

    python tests/netns_cluster.py up [N]   # N hosts (default 3); Ctrl-C or SIGTERM tears down
    python tests/netns_cluster.py down     # tear down leftovers of a crashed run

Authentication: Ray 2.60 decides token auth per process, from RAY_AUTH_MODE or, when unset, from
whether ~/.ray/auth_token exists (which any local `ray.init()` creates). Left implicit, the head,
the workers and the drivers can disagree and workers fail to join, so the mode is set explicitly
for every process: auth="token" (default) writes a fresh per-cluster token to
{state_dir}/auth_token and gives every Ray process RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH;
a driver needs the same two variables (`driver_env()`; `run_in()` adds them): without them,
ray.init(address=...) fails with a bare ConnectionError after ~20 s. auth="disabled" sets
RAY_AUTH_MODE=disabled everywhere instead.

Environment and code: workers inherit their raylet's environment, so env_per_host[i] (say a
per-host DEEPFLOW_CACHE) is what every actor on host i sees in os.environ. Ray starts workers with
the venv's interpreter, in the repository root as cwd; it puts the driver's script directory and
cwd on their sys.path, so a driver run from the repository root (deepflow.py) can use project
modules in actors; otherwise pass runtime_env={"env_vars": {"PYTHONPATH": <repo root>}}.
"""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Self

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def can_create_namespaces() -> str | None:
    """None if this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) not found"
    probe = f"dfprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _ns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _kill_all(pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is still running after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while (pids := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            return


class NetnsCluster:
    """n "hosts" (network namespaces on one bridge) with a Ray node in each; a context manager.

    Attributes: `hosts` (IPs; host 0 runs the Ray head), `head_address` ("ip:port" of the GCS),
    `timings` (seconds per phase of the last up()/down()). `env_per_host[i]` is added to the
    environment of host i's Ray processes, and so reaches every actor on that node.
    """

    def __init__(self, n_hosts: int, prefix: str = "df", subnet: str = "10.77.0",
                 env_per_host: dict[int, dict] | None = None, *, gcs_port: int = 6380, num_cpus: int = 1,
                 auth: str = "token", state_dir: str | None = None):
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be 1..250")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):  # interface names are at most 15 bytes
            raise ValueError("prefix: a lowercase letter, then up to 7 letters/digits")
        if auth not in ("token", "disabled"):
            raise ValueError("auth must be 'token' or 'disabled'")
        self.n = n_hosts
        self.prefix = prefix
        self.subnet = subnet
        self.env_per_host = env_per_host or {}
        self.gcs_port = gcs_port
        self.num_cpus = num_cpus
        self.auth = auth
        self.state_dir = state_dir or f"/tmp/ray-{prefix}"  # per-host Ray temp dirs (logs) + token
        self.bridge = f"{prefix}-br0"
        self.hosts = [f"{subnet}.{i + 2}" for i in range(n_hosts)]
        self.head_address = f"{self.hosts[0]}:{gcs_port}"
        self.timings: dict[str, float] = {}

    # ---- names -------------------------------------------------------------------------------
    def namespace(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def temp_dir(self, i: int) -> str:
        """Host i's Ray temp dir (its session logs are under session_latest/logs)."""
        return os.path.join(self.state_dir, f"h{i}")

    @property
    def token_path(self) -> str:
        return os.path.join(self.state_dir, "auth_token")

    def driver_env(self) -> dict[str, str]:
        """What a Ray driver (ray.init(address=head_address)) needs in its environment."""
        env = {"RAY_AUTH_MODE": self.auth}
        if self.auth == "token":
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        return env

    def host_env(self, i: int) -> dict[str, str]:
        """The full environment of host i's Ray processes (and so of its workers and actors)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_TMPDIR")}
        env.update(self.driver_env())
        env.update({k: str(v) for k, v in self.env_per_host.get(i, {}).items()})
        return env

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, started: int | None = None) -> Self:
        """Create all n hosts' namespaces; start Ray on the first `started` (default all; 0: no
        Ray, the network alone): the others join later with `join(i)`, as machines added to a
        running cluster."""
        t0 = time.monotonic()
        self._cleanup()
        t1 = time.monotonic()
        self._make_network()
        t2 = time.monotonic()
        if started == 0:
            self.timings = {"cleanup": t1 - t0, "network": t2 - t1, "up": t2 - t0}
            return self
        shutil.rmtree(self.state_dir, ignore_errors=True)
        os.makedirs(self.state_dir, mode=0o700)
        if self.auth == "token":
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        # Workers start once the head is up, all in parallel. Starting them as soon as the GCS
        # port answers was no faster on 2 cores (3 hosts: 6.9-11.3 s against 6.3-9.9 s): `ray
        # start` polls GCS and node registration in 1 s steps, and CPU is the other limit.
        self._check_started(0, self._ray_start(0, ["--head", f"--port={self.gcs_port}",
                                                   "--include-dashboard=false",
                                                   f"--node-ip-address={self.hosts[0]}"]))
        t3 = time.monotonic()
        workers = [self._worker(i) for i in range(1, self.n if started is None else started)]
        for i, proc in enumerate(workers, 1):
            self._check_started(i, proc)
        t4 = time.monotonic()
        self.timings = {"cleanup": t1 - t0, "network": t2 - t1, "head": t3 - t2, "workers": t4 - t3, "up": t4 - t0}
        return self

    def _worker(self, i: int) -> subprocess.Popen:
        return self._ray_start(i, [f"--address={self.head_address}", f"--node-ip-address={self.hosts[i]}"])

    def join(self, i: int) -> None:
        """Start host i's Ray node (a machine joining the running cluster)."""
        self._check_started(i, self._worker(i))

    def set_link(self, i: int, up: bool) -> None:
        """Unplug host i's cable to the bridge (its processes keep running, cut off), or plug it back."""
        _ip("link", "set", f"{self.prefix}-v{i}", "up" if up else "down")

    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, outer, inner = self.namespace(i), f"{self.prefix}-v{i}", f"{self.prefix}-p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.hosts[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{self.subnet}.1")
            # TCP's retransmission backoff (up to 120 s) would keep Ray's connections silent for
            # seconds after a cut link heals; bounded at 2 s (Linux 6.15+; ignored before).
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_rto_max_ms=2000"],
                           check=False, capture_output=True)

    def _ray_start(self, i: int, args: list[str]) -> subprocess.Popen:
        argv = ["ip", "netns", "exec", self.namespace(i), RAY, "start", *args,
                # TEs are not Ray tasks and node agents ask for num_cpus=0; num_cpus=1 (the default)
                # only lets a plain @ray.remote task run on the node.
                f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--disable-usage-stats",
                f"--temp-dir={self.temp_dir(i)}"]
        return subprocess.Popen(argv, env=self.host_env(i), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def _check_started(self, i: int, proc: subprocess.Popen) -> None:
        """`ray start` (without --block) returns once its node has registered with the GCS."""
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ray start on {self.namespace(i)} failed ({proc.returncode}):\n{out[-4000:]}")

    def run_in(self, i: int, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside host i's namespace. Its environment is this process's, plus
        driver_env() and env_per_host[i], plus `env` if given (added on top, not a replacement)."""
        env = {**os.environ, **self.driver_env(), **{k: str(v) for k, v in self.env_per_host.get(i, {}).items()},
               **(popen_kwargs.pop("env", None) or {})}
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *argv], env=env, **popen_kwargs)

    def down(self, grace_s: float = 1.0) -> None:
        """Stop every process in the hosts' namespaces by PID (SIGTERM, SIGKILL after grace_s),
        then remove the network. Idempotent; also cleans up after a partial up() or a crashed run
        with this prefix. Ray's gcs_server, raylet and runtime-env agent do not exit on SIGTERM
        within 10 s once their peers go, so a long grace only slows teardown."""
        t0 = time.monotonic()
        self._cleanup(grace_s)
        self.timings["down"] = time.monotonic() - t0

    def _cleanup(self, grace_s: float = 1.0) -> None:
        listed = _ip("netns", "list", check=False).stdout.split("\n")
        pattern = re.compile(rf"{re.escape(self.prefix)}-h\d+")
        namespaces = [line.split()[0] for line in listed if line.strip() and pattern.fullmatch(line.split()[0])]
        for _ in range(3):  # again, in case something forked while we were killing
            pids = [p for ns in namespaces for p in _ns_pids(ns) if _alive(p)]
            if not pids:
                break
            _kill_all(pids, grace_s)
        for ns in namespaces:  # deleting a namespace also deletes the veth ends inside it
            _ip("netns", "del", ns, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            m = re.match(rf"\d+: ({re.escape(self.prefix)}-v\d+)@", line)
            if m:
                _ip("link", "del", m.group(1), check=False)
        _ip("link", "del", self.bridge, check=False)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down") or len(argv) > 2:
        print("\n\n".join(__doc__.split("\n\n")[2:4]), file=sys.stderr)
        return 2
    reason = can_create_namespaces()
    if reason:
        print(f"cannot create network namespaces: {reason}", file=sys.stderr)
        return 1
    if argv[0] == "down":
        NetnsCluster(1).down()
        return 0
    cluster = NetnsCluster(int(argv[1]) if len(argv) > 1 else 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `finally` tears down
    try:
        cluster.up()
        env = " ".join(f"{k}={v}" for k, v in cluster.driver_env().items())
        py = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable
        print(f"Ray cluster up in {cluster.timings['up']:.1f} s; head (GCS) at {cluster.head_address}")
        for i, ip in enumerate(cluster.hosts):
            print(f"  host {i}: {ip}  (ip netns exec {cluster.namespace(i)} ...)"
                  f"{'  <- head' if i == 0 else ''}")
        print(f"Ray logs: {cluster.state_dir}/h<i>/session_latest/logs")
        print("Serve from host 0 (from the repository root):")
        print(f"  ip netns exec {cluster.namespace(0)} env {env} {py} deepflow.py serve --backend ray "
              f"--ray-address {cluster.head_address} --host {cluster.hosts[0]}")
        print("Ctrl-C to tear down.", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.down()
        print(f"torn down in {cluster.timings.get('down', 0):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
