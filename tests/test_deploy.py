"""The deployment, docker-compose.yml: it parses with docker-compose v1, and its services work together.

There is no Docker engine here, so the second half runs the compose services' own commands natively,
inside a private network namespace that has only a loopback interface and an /etc/hosts naming every
service 127.0.0.1: host names, ports, environment and commands are those `docker-compose config`
prints (with one MLflow worker and small Ray nodes for two cores). Stand-ins for the two images that
are not ours: Debian's PostgreSQL server for `postgres`, moto's S3 server for `minio`. Nothing
listens outside the namespace, and teardown stops exactly the processes that live in it.
The last test runs docs/deploy.md's "Without Docker" section as written, step by step, the same way.
Needs root (namespaces) and scripts/setup.sh --test (the cluster extra and scripts/setup-deploy-tools.sh).
"""

from __future__ import annotations

import fnmatch
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / ".venv-compose" / "bin" / "docker-compose"
BIN = Path(sys.executable).parent
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "mlflow-init", "ray-head", "ray-worker"}
APP_SERVICES = {"mlflow", "mlflow-init", "ray-head", "ray-worker"}  # built from this project's image
RAY_SERVICES = {"ray-head", "ray-worker"}
# The credentials the file requires (it has no defaults for them), and what a user could set too.
SECRETS = {"POSTGRES_PASSWORD": "pg-test-pass", "MINIO_ROOT_USER": "test-key", "MINIO_ROOT_PASSWORD": "test-s3-pass",
           "MINIO_MLFLOW_PASSWORD": "s3-mlflow-pass", "MINIO_NODE_PASSWORD": "s3-node-pass",
           "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-pass", "MLFLOW_NODE_PASSWORD": "mlflow-node-pass",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-test-key",
           "RAY_AUTH_TOKEN": "0123456789abcdef0123456789abcdef"}
# Who may hold which secret (docs/deploy.md, "Which secret goes where"): nobody else gets it.
HOLDERS = {"POSTGRES_PASSWORD": {"postgres", "mlflow"}, "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
           "MINIO_MLFLOW_PASSWORD": {"minio-init", "mlflow"}, "MINIO_NODE_PASSWORD": {"minio-init", *RAY_SERVICES},
           "MLFLOW_ADMIN_PASSWORD": {"mlflow", "mlflow-init"}, "MLFLOW_NODE_PASSWORD": {"mlflow-init", *RAY_SERVICES},
           "MLFLOW_FLASK_SERVER_SECRET_KEY": {"mlflow"}, "RAY_AUTH_TOKEN": RAY_SERVICES}
TEST_ENV = {"MLFLOW_WORKERS": "1"}
# Each Ray node would otherwise claim the whole machine's CPUs and memory.
RAY_NODE_LIMITS = ["--num-cpus=1", "--memory=1000000000", "--object-store-memory=100000000"]


def compose_config(file: Path = ROOT / "docker-compose.yml", **env: str) -> dict:
    """`docker-compose config`, rendered with only SECRETS and ``env`` set: the file's defaults are tested."""
    out = _compose_config(file, {**SECRETS, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return yaml.safe_load(out.stdout)


def _compose_config(file: Path, env: dict) -> subprocess.CompletedProcess:
    if not COMPOSE.exists():
        pytest.fail("no .venv-compose/bin/docker-compose: run scripts/setup-deploy-tools.sh")
    return subprocess.run([str(COMPOSE), "--project-directory", str(ROOT), "-f", str(file), "config"], cwd=ROOT,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory) -> Path:
    """docs/deploy.md's docker-compose.cluster.yml (Ray nodes on the hosts' networks), saved as a file."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    found = re.findall(r"```yaml\n(# docker-compose\.cluster\.yml.*?)```", text, re.S)
    assert len(found) == 1, "docs/deploy.md should show docker-compose.cluster.yml once"
    path = tmp_path_factory.mktemp("cluster") / "docker-compose.cluster.yml"
    path.write_text(found[0])
    return path


# ---------------------------------------------------------------------------------------------
# The file


def test_compose_config_names_every_service_and_reserves_gpus_for_workers():
    services = compose_config()["services"]
    assert set(services) == SERVICES
    assert services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in APP_SERVICES:  # one image, built from this project
        assert services[name]["build"]["context"] == str(ROOT), name
        assert services[name]["image"] == services["mlflow"]["image"], name
    assert services["ray-head"]["command"][:4] == ["ray", "start", "--head", "--port=6379"]
    assert services["ray-worker"]["command"][:3] == ["ray", "start", "--address=ray-head:6379"]
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_USAGE_STATS_ENABLED"] == "0", name
        assert env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"], name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        # trials log in as the non-admin user, and reach the object store as its limited user
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("sae-node", "mlflow-node-pass")
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("sae-node", "s3-node-pass"), name
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert command[command.index("--app-name") + 1] == "basic-auth"
    env = services["mlflow"]["environment"]
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("admin", "mlflow-admin-pass")
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:pg-test-pass@postgres:5432/mlflow"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("sae-mlflow", "s3-mlflow-pass")
    assert command[command.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow-init"]["command"] == ["python", "/opt/sae-registry/scripts/mlflow-node-user.py"]
    assert services["minio-init"]["entrypoint"] == ["/bin/sh", "/usr/local/bin/minio-init.sh"]
    assert f"{ROOT}/scripts/minio-init.sh:/usr/local/bin/minio-init.sh:ro" in services["minio-init"]["volumes"]
    # published ports answer on the Docker host's loopback only
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    for name, service in services.items():
        if not name.endswith("-init"):
            assert "healthcheck" in service or name == "ray-worker", name


def test_each_secret_reaches_only_the_services_that_need_it():
    """Least privilege: the MinIO root keys, MLflow's admin and the PostgreSQL password stay where they are used."""
    config = compose_config()
    for secret, holders in HOLDERS.items():
        value = SECRETS[secret]
        have = {name for name, service in config["services"].items() if value in json.dumps(service)}
        assert have == holders, (secret, have)
    # and no password is on a command line, which every local user can read (ps, /proc/PID/cmdline)
    for name, service in config["services"].items():
        argv = json.dumps([service.get("command"), service.get("entrypoint"), service.get("healthcheck")])
        leaked = [k for k, v in SECRETS.items() if v in argv]
        assert not leaked, (name, leaked)


def test_every_image_is_pinned():
    """No `latest` and no bare major version: an image changes only when its pin does."""
    services = compose_config()["services"]
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", (name, service["image"])
        assert re.search(r"\d+\.\d+|RELEASE\.\d{4}-", tag), (name, service["image"])
    base = re.search(r"^FROM (\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for service in ("postgres", "minio", "minio-init"):
        assert f"`{services[service]['image']}`" in docs, f"docs/deploy.md should name the pinned {service} image"


def test_credentials_and_settings_come_from_the_environment():
    services = compose_config(POSTGRES_PASSWORD="pg-pass", MINIO_NODE_USER="node-key", MINIO_NODE_PASSWORD="s3-pass",
                              RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="ray-token", MLFLOW_PORT="5555",
                              MLFLOW_WORKERS="3", MLFLOW_NODE_USERNAME="trials")["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-pass"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == \
        "postgresql://mlflow:pg-pass@postgres:5432/mlflow"
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--workers") + 1] == "3"
    assert "127.0.0.1:5555:5000/tcp" in services["mlflow"]["ports"]
    assert services["minio"]["environment"] == {"MINIO_ROOT_USER": "test-key", "MINIO_ROOT_PASSWORD": "test-s3-pass"}
    init = services["minio-init"]["environment"]
    assert (init["MINIO_NODE_USER"], init["MINIO_NODE_PASSWORD"]) == ("node-key", "s3-pass")
    assert services["mlflow-init"]["environment"]["MLFLOW_NODE_USERNAME"] == "trials"
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("node-key", "s3-pass"), name
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", "ray-token"), name
        assert env["MLFLOW_TRACKING_USERNAME"] == "trials", name


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_the_file_refuses_to_start_without_each_credential(missing):
    """No default password anywhere: compose names the credential that is not set."""
    out = _compose_config(ROOT / "docker-compose.yml", {k: v for k, v in SECRETS.items() if k != missing})
    assert out.returncode != 0 and missing in out.stderr, out.stderr[-2000:]
    assert "minioadmin" not in (ROOT / "docker-compose.yml").read_text()


def test_the_documented_cluster_file_puts_ray_on_host_networks_with_a_token(cluster_file):
    base = compose_config()["services"]
    services = compose_config(cluster_file, HEAD_HOST="10.0.0.5", RAY_AUTH_TOKEN="t0k3n")["services"]
    assert set(services) == RAY_SERVICES
    for name, service in services.items():
        assert service["network_mode"] == "host" and "ports" not in service, name
        assert (service["image"], service["build"]) == (base[name]["image"], base[name]["build"]), name
        env = service["environment"]
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"], env["RAY_USAGE_STATS_ENABLED"]) == ("token", "t0k3n", "0")
        assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
        assert env["AWS_ENDPOINT_URL"] == "http://10.0.0.5:9000"
        assert (env["AWS_ACCESS_KEY_ID"], env["MLFLOW_TRACKING_USERNAME"]) == ("sae-node", "sae-node")
        assert SECRETS["MINIO_ROOT_PASSWORD"] not in json.dumps(service)
        assert SECRETS["MLFLOW_ADMIN_PASSWORD"] not in json.dumps(service)
    assert "--node-ip-address=10.0.0.5" in services["ray-head"]["command"]
    assert services["ray-worker"]["command"][:3] == ["ray", "start", "--address=10.0.0.5:6379"]
    assert services["ray-worker"]["deploy"] == base["ray-worker"]["deploy"]
    # no token, no cluster
    out = _compose_config(cluster_file, {**{k: v for k, v in SECRETS.items() if k != "RAY_AUTH_TOKEN"},
                                         "HEAD_HOST": "10.0.0.5"})
    assert out.returncode != 0 and "RAY_AUTH_TOKEN" in out.stderr


def test_the_image_takes_the_build_args_compose_passes():
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', dockerfile, re.M))
    build = compose_config()["services"]["mlflow"]["build"]["args"]
    assert set(build) <= set(args)
    assert args["TORCH_SPEC"] == build["TORCH_SPEC"] == "torch==2.13.0"
    # a node can harvest and evaluate the demo model, and run the dashboard, jobs and S3 stores
    assert re.search(r'pip install "\.\[cluster,demo\]"', dockerfile), "the image installs .[cluster,demo]"


def _dockerignore_rules() -> list[tuple[bool, str]]:
    """(exclude?, pattern) per line of .dockerignore, in order (the last match wins, as in Docker)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), line.lstrip("!").strip("/")))
    return rules


def _docker_match(pattern: str, path: str) -> bool:
    """Docker's .dockerignore match: filepath.Match per path element, `**` any number of them; a
    pattern matching a directory matches everything under it."""
    def match(pats: list[str], parts: list[str]) -> bool:
        if not pats:
            return True  # matched a parent directory: everything below is in (or out) with it
        if pats[0] == "**":
            return any(match(pats[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(pats[1:], parts[1:])
    return match(pattern.split("/"), path.split("/"))


def _in_build_context(path: str, rules) -> bool:
    excluded = False
    for exclude, pattern in rules:
        if _docker_match(pattern, path):
            excluded = exclude
    return not excluded


def test_no_secret_or_local_state_can_reach_the_image(tmp_path):
    """A checkout holding .env files, a venv, data and a local registry: only what the image needs is
    in the build context, and the Dockerfile's COPY lines name only files that are."""
    tree = ["pyproject.toml", "README.md", "sae_registry/__init__.py", "sae_registry/sweep.py", "jobs/demo.yaml",
            "scripts/mlflow-node-user.py"]
    secret = [".env", ".env.local", "prod.env", "sae_registry/.env", "jobs/.env", "deploy/secrets.env",
              ".venv/bin/python", "data/minilm-l3.zarr/zarr.json", "mlflow.db", "mlruns/0/meta.yaml",
              "runs/demo/sae.safetensors", ".git/config", "tests/test_deploy.py", "scripts/setup.sh",
              "sae_registry/__pycache__/sweep.cpython-311.pyc", "notes/aws-credentials", "id_rsa"]
    for rel in tree + secret:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("AWS_SECRET_ACCESS_KEY=leaked\n" if rel not in tree else "")
    rules = _dockerignore_rules()
    context = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
               and _in_build_context(str(p.relative_to(tmp_path)), rules)}
    assert context == set(tree), sorted(context ^ set(tree))
    # the matcher itself: Docker's own examples
    assert _docker_match("**/.env", ".env") and _docker_match("**/.env", "a/b/.env")
    assert _docker_match("*", "sae_registry") and not _docker_match("*.md", "docs/x.md")
    # every COPY source of the Dockerfile is something the context holds; none copies the whole tree
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", dockerfile, re.M)
    assert copies
    for sources, _ in copies:
        for source in sources.split():
            assert source.strip("/") not in (".", "*", ""), f"COPY {sources}: copies the whole context"
            assert _in_build_context(source.strip("/"), rules), source


def test_setup_installs_the_cluster_extra_with_a_flag():
    """`scripts/setup.sh --cluster` (and --test) installs .[cluster]: the dashboard, jobs, Ray Client, S3, auth."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    cluster = re.search(r"^cluster = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    for need in ('"ray[default,client]', '"s3fs', '"boto3', '"mlflow[auth]', '"psycopg[binary]'):
        assert need in cluster, need
    assert re.search(r'^    "torch>=2\.6"', pyproject, re.M), "torch below 2.6: torch.load can run code (CVE-2025-32434)"
    setup = ROOT / "scripts" / "setup.sh"
    script = setup.read_text()
    assert re.search(r"--cluster\|--test\) extras=\$extras,cluster", script)
    bad = subprocess.run(["bash", str(setup), "--clustr"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "usage" in bad.stderr  # a typo fails before anything is installed
    # the environment the tests run in has what a node needs: Ray's dashboard is not "minimal"
    import importlib.util
    for module in ("aiohttp_cors", "prometheus_client", "grpc", "s3fs", "psycopg", "flask_wtf"):
        assert importlib.util.find_spec(module), f"{module} missing: run scripts/setup.sh --cluster"


def test_every_doc_snippet_that_gives_a_client_the_ray_token_sets_the_token_mode():
    """A client with RAY_AUTH_TOKEN but not RAY_AUTH_MODE=token is refused by a token cluster: every
    `export` of the token, and every environment file written with it, sets the mode beside it."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    lines = [line for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    giving = [line for line in lines if "RAY_AUTH_TOKEN=" in line
              and (line.lstrip().startswith("export") or "printf" in line)]
    assert len(giving) >= 4, giving  # the laptop, Ray Client, and the native node and client files
    for line in giving:
        assert "RAY_AUTH_MODE=token" in line, line


# ---------------------------------------------------------------------------------------------
# The services, run natively in a private network namespace


class Namespace:
    """A network + mount namespace: loopback only, and an /etc/hosts that names ``hosts`` 127.0.0.1."""

    def __init__(self, root: Path, hosts: list[str], binds: dict[Path, Path] | None = None,
                 external: str | None = None):
        """``binds``: directories mounted over others inside; ``external``: an address (CIDR) on a
        second interface, with a default route through it, as a host on a network has."""
        hosts_file = root / "hosts"
        hosts_file.write_text(f"127.0.0.1 localhost {socket.gethostname()} {' '.join(hosts)}\n::1 localhost\n")
        script = f"ip link set lo up && mount --bind {hosts_file} /etc/hosts"
        for source, target in (binds or {}).items():
            script += f" && mount --bind {source} {target}"
        if external:
            gateway = external.rsplit(".", 1)[0] + ".1"
            script += (f" && ip link add ext0 type veth peer name ext1 && ip addr add {external} dev ext0"
                       f" && ip link set ext0 up && ip link set ext1 up && ip route add default via {gateway}")
        script += " && echo ready && exec sleep infinity"
        self.holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            raise RuntimeError(f"could not make a network namespace: {line}{self.holder.stdout.read()}")
        self.inode = os.stat(f"/proc/{self.holder.pid}/ns/net").st_ino
        self.started: list[tuple[subprocess.Popen, int]] = []  # (process, its stop signal)
        self.logs: dict[str, Path] = {}

    def argv(self, argv: list[str], user: pwd.struct_passwd | None = None, wd: Path | None = None) -> list[str]:
        prefix = ["nsenter", f"--target={self.holder.pid}", "--net", "--mount"]
        if wd is not None:  # entering the mount namespace starts in its root directory otherwise
            prefix.append(f"--wd={wd}")
        if user is not None:
            prefix += [f"--setgid={user.pw_gid}", f"--setuid={user.pw_uid}"]
        return [*prefix, "--", *map(str, argv)]

    def start(self, name: str, argv: list, env: dict, log_dir: Path, user=None, stop_signal=signal.SIGTERM,
              cwd: Path | None = None):
        self.logs[name] = log_dir / f"{name}.log"
        proc = subprocess.Popen(self.argv(argv, user), stdout=open(self.logs[name], "w"), stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=cwd)
        self.started.append((proc, stop_signal))
        return proc

    def run(self, argv: list, env: dict, timeout: float = 120, user=None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv, user), env=env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code, *args], env, timeout=timeout)

    def pids(self) -> list[int]:
        """Live (not zombie) processes in this network namespace: only what this test started."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}/ns/net").st_ino != self.inode:
                        continue
                    with open(f"/proc/{entry}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != "Z":
                    found.append(int(entry))
        return found

    def wait_until(self, name: str, proc: subprocess.Popen | None, check, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            if check():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} was not ready in {timeout}s:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        log = self.logs.get(name)
        return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""

    def stop(self, grace: float = 10) -> None:
        """Each service's stop signal first (`ray start --block` takes its node's processes down with
        it), then TERM and at last KILL for whatever still lives in the namespace, the holder included."""
        for proc, sig in reversed(self.started):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for proc, _ in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                time.sleep(0.1)
                pids = self.pids()
            if not pids:
                break
        for proc in [p for p, _ in self.started] + [self.holder]:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _healthcheck(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return test[1:]


def _postgres(ns: Namespace, service: dict, port: int, root: Path, env: dict) -> None:
    """The postgres image's job: a server with POSTGRES_USER/PASSWORD/DB, password login over TCP."""
    conf = service["environment"]
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    assert found, "no PostgreSQL server under /usr/lib/postgresql: run scripts/setup-deploy-tools.sh"
    bindir = found[-1].parent
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    data = root / "pg"
    data.mkdir(mode=0o700)
    pwfile = root / "pg.pw"
    pwfile.write_text(conf["POSTGRES_PASSWORD"] + "\n")
    for path in (data, pwfile):
        os.chown(path, user.pw_uid, user.pw_gid)
    init = subprocess.run([bindir / "initdb", "-D", data, "-U", conf["POSTGRES_USER"], f"--pwfile={pwfile}",
                           "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                          user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=data, env=env,
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stdout + init.stderr
    proc = ns.start("postgres", [bindir / "postgres", "-D", data, "-k", data, "-p", port, "-h", "127.0.0.1"], env,
                    root, user=user, stop_signal=signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
    ns.wait_until("postgres", proc, lambda: ns.run([bindir / "pg_isready", "-h", "postgres", "-p", port], env,
                                                   timeout=30).returncode == 0, timeout=60)
    made = ns.run([bindir / "createdb", "-h", data, "-p", port, "-U", conf["POSTGRES_USER"], conf["POSTGRES_DB"]],
                  env, user=user)
    assert made.returncode == 0, made.stderr


FAKE_MC = r"""
# A stand-in for MinIO's `mc` over moto's S3 server: buckets are made for real; policies, users and
# attachments (MinIO's admin API, which moto lacks) are recorded as JSON lines in $MC_LOG.
import json, os, sys
import boto3
state = os.path.join(os.environ["MC_LOG"] + ".aliases")
aliases = json.load(open(state)) if os.path.exists(state) else {}
args = sys.argv[1:]
def record(**kw):
    with open(os.environ["MC_LOG"], "a") as f:
        f.write(json.dumps(kw) + "\n")
if args[:2] == ["alias", "set"]:
    aliases[args[2]] = args[3:6]
    json.dump(aliases, open(state, "w"))
elif args[0] == "mb":
    alias, bucket = args[-1].split("/", 1)
    url, key, secret = aliases[alias]
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret)
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    record(op="mb", bucket=bucket, root=key)
elif args[:3] == ["admin", "policy", "create"]:
    record(op="policy", name=args[4], document=json.load(open(args[5])))
elif args[:3] == ["admin", "user", "add"]:
    record(op="user", name=args[4], secret=args[5])
elif args[:3] == ["admin", "policy", "attach"]:
    record(op="attach", policy=args[4], user=args[args.index("--user") + 1])
else:
    sys.exit(f"fake mc: unexpected {args}")
"""


def _fake_mc(root: Path) -> tuple[Path, Path]:
    """A directory holding the stand-in `mc`, and the log it writes."""
    bindir = root / "fake-bin"
    bindir.mkdir()
    (bindir / "mc").write_text(f"#!{sys.executable}\n{FAKE_MC}")
    (bindir / "mc").chmod(0o755)
    return bindir, root / "mc.log"


def _mc_calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _answers_http(ns: Namespace, url: str, env: dict) -> bool:
    code = ("import sys, urllib.request, urllib.error\n"
            "try: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
            "except urllib.error.HTTPError: pass\n")
    return ns.python(code, env, url, timeout=30).returncode == 0


def _ray_nodes(ns: Namespace, services: dict, env, root: Path) -> subprocess.Popen:
    """The ray-head service, healthy by its own healthcheck, then one ray-worker; returns the worker."""
    temp = f"--temp-dir={root / 'ray'}"
    head = ns.start("ray-head", [*services["ray-head"]["command"], *RAY_NODE_LIMITS, temp], env("ray-head"), root)
    ns.wait_until("ray-head", head, lambda: ns.run(_healthcheck(services["ray-head"]), env("ray-head"),
                                                   timeout=60).returncode == 0)
    return ns.start("ray-worker", [*services["ray-worker"]["command"], *RAY_NODE_LIMITS, temp], env("ray-worker"),
                    root)


def _workspace(services: dict):
    """A fresh directory, the base environment, and each service's environment on top of it."""
    # Under /tmp, not pytest's 0700 tree: PostgreSQL runs as its own user, and Ray's socket paths
    # must stay short.
    root = Path(tempfile.mkdtemp(prefix="sae-deploy-", dir="/tmp"))
    root.chmod(0o711)
    (root / "home").mkdir()
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(root / "home"),
            "LANG": "C.UTF-8"}

    def env(name: str) -> dict:
        return {**base, **{k: "" if v is None else str(v) for k, v in services[name].get("environment", {}).items()}}

    return root, base, env


def _json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


RAY_ADDRESS_CODE = """
import json, os, sys, time, ray
ray.init(address=sys.argv[1], logging_level="warning")
deadline = time.monotonic() + 60
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
"""


def test_the_cluster_files_ray_nodes_join_with_the_token_and_refuse_others(cluster_file):
    """docker-compose.cluster.yml's head and worker (HEAD_HOST=127.0.0.1 in the namespace): token auth."""
    if os.geteuid() != 0:
        pytest.skip("runs the services in a private network namespace: needs root")
    services = compose_config(cluster_file, HEAD_HOST="127.0.0.1",
                              RAY_AUTH_TOKEN="0123456789abcdef0123456789abcdef")["services"]
    root, base, env = _workspace(services)
    ns = Namespace(root, sorted(services))
    try:
        worker = _ray_nodes(ns, services, env, root)
        code = RAY_ADDRESS_CODE + "print(json.dumps({'alive': len(alive)}))\n"
        assert _json(ns.python(code, env("ray-worker"), "127.0.0.1:6379")) == {"alive": 2}
        # A driver with a wrong token is refused too, but only after ~20 s of retries; `ray status` says so at once.
        wrong = {**env("ray-worker"), "RAY_AUTH_TOKEN": "not-the-token"}
        refused = ns.run(["ray", "status", "--address", "127.0.0.1:6379"], wrong, timeout=60)
        assert refused.returncode != 0 and "token" in refused.stderr, refused.stderr[-2000:]
        assert ns.run(["ray", "status", "--address", "127.0.0.1:6379"], env("ray-head"), timeout=60).returncode == 0
        assert worker.poll() is None
    finally:
        ns.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack():
    if os.geteuid() != 0:
        pytest.skip("runs the services in a private network namespace: needs root")
    services = compose_config(**TEST_ENV)["services"]
    root, base, env = _workspace(services)
    ns = Namespace(root, sorted(services))
    try:
        mlflow_cmd = services["mlflow"]["command"]
        pg_port = urlparse(services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]).port
        s3_url = services["ray-head"]["environment"]["AWS_ENDPOINT_URL"]
        _postgres(ns, services["postgres"], pg_port, root, base)

        proc = ns.start("minio", [BIN / "moto_server", "-H", "127.0.0.1", "-p", urlparse(s3_url).port], base, root)
        ns.wait_until("minio", proc, lambda: _answers_http(ns, s3_url, base))
        # minio-init: its script (mounted into the mc image) with the stand-in mc on the PATH
        bindir, mc_log = _fake_mc(root)
        init = services["minio-init"]
        script = next(v.split(":")[0] for v in init["volumes"] if v.endswith(":/usr/local/bin/minio-init.sh:ro"))
        made = ns.run(["sh", script], {**env("minio-init"), "PATH": f"{bindir}:{base['PATH']}", "MC_LOG": str(mc_log)})
        assert made.returncode == 0, made.stdout + made.stderr

        # its working_dir (where the auth app keeps basic_auth.db) is a volume: a directory here
        auth_dir = root / services["mlflow"]["working_dir"].strip("/").replace("/", "-")
        auth_dir.mkdir()
        mlflow = ns.start("mlflow", mlflow_cmd, env("mlflow"), root, cwd=auth_dir)
        worker = _ray_nodes(ns, services, env, root)
        ns.wait_until("mlflow", mlflow, lambda: ns.run(_healthcheck(services["mlflow"]), env("mlflow"),
                                                       timeout=60).returncode == 0, timeout=180)
        # mlflow-init: the image's copy of scripts/mlflow-node-user.py is this checkout's
        command = [c.replace("/opt/sae-registry/", f"{ROOT}/") for c in services["mlflow-init"]["command"]]
        made = ns.run(command, env("mlflow-init"))
        assert made.returncode == 0, made.stdout + made.stderr
        yield {"ns": ns, "services": services, "env": env, "base": base, "worker": worker, "mc_log": mc_log,
               "mlflow": mlflow}
    finally:
        ns.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_takes_the_mlflow_login(stack):
    conf = stack["services"]["postgres"]["environment"]
    code = ("import json, sys, psycopg\n"
            "c = psycopg.connect(host='postgres', port=5432, user=sys.argv[1], password=sys.argv[2],\n"
            "                    dbname=sys.argv[3])\n"
            "cur = c.cursor(); cur.execute('select current_user, current_database()')\n"
            "print(json.dumps(cur.fetchone()))\n")
    got = _json(stack["ns"].python(code, stack["base"], conf["POSTGRES_USER"], conf["POSTGRES_PASSWORD"],
                                   conf["POSTGRES_DB"]))
    assert got == [conf["POSTGRES_USER"], conf["POSTGRES_DB"]]


def test_the_object_store_has_the_buckets(stack):
    code = "import json, boto3; print(json.dumps([b['Name'] for b in boto3.client('s3').list_buckets()['Buckets']]))"
    buckets = set(_json(stack["ns"].python(code, stack["env"]("ray-head"))))
    assert buckets == {"mlflow", "activations", "ray-results"}  # ray-results: jobs/gpu-grid.yaml's Tune storage


def test_minio_init_makes_users_limited_to_their_buckets(stack):
    """scripts/minio-init.sh, as the minio-init service runs it: each user gets a policy naming only its buckets."""
    calls = _mc_calls(stack["mc_log"])
    policies = {c["name"]: c["document"] for c in calls if c["op"] == "policy"}
    users = {c["name"]: c["secret"] for c in calls if c["op"] == "user"}
    attached = {(c["user"], c["policy"]) for c in calls if c["op"] == "attach"}

    def buckets(document):
        (statement,) = document["Statement"]
        assert statement["Effect"] == "Allow"
        return {r.removeprefix("arn:aws:s3:::").removesuffix("/*") for r in statement["Resource"]}

    assert buckets(policies["sae-mlflow"]) == {"mlflow"}
    assert buckets(policies["sae-node"]) == {"activations", "ray-results"}
    assert users == {"sae-mlflow": SECRETS["MINIO_MLFLOW_PASSWORD"], "sae-node": SECRETS["MINIO_NODE_PASSWORD"]}
    assert attached == {("sae-mlflow", "sae-mlflow"), ("sae-node", "sae-node")}
    # what the services use is those users, not the root keys
    assert stack["env"]("mlflow")["AWS_ACCESS_KEY_ID"] == "sae-mlflow"
    assert stack["env"]("ray-worker")["AWS_ACCESS_KEY_ID"] == "sae-node"


def test_the_postgres_password_is_on_no_command_line(stack):
    """Every process of the stack, MLflow's server and its workers included: /proc/PID/cmdline is world-readable."""
    leaked = {}
    for pid in stack["ns"].pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_NODE_PASSWORD"):
            if SECRETS[name] in argv:
                leaked[pid] = (name, argv.replace("\0", " ")[:200])
    assert not leaked, leaked
    assert stack["mlflow"].poll() is None


def test_a_ray_node_logs_to_mlflow_with_runs_in_postgres_and_artifacts_in_the_bucket(stack):
    # As a trial on a Ray worker would: MLFLOW_TRACKING_URI=http://mlflow:5000 from its environment.
    code = """
import json, boto3, mlflow
mlflow.set_experiment("deploy-check")
with mlflow.start_run() as run:
    mlflow.log_metric("fvu", 0.25)
    mlflow.log_text("hello from a ray node", "notes/hello.txt")
print(json.dumps({"run_id": run.info.run_id, "uri": run.info.artifact_uri}))
"""
    got = _json(stack["ns"].python(code, stack["env"]("ray-worker")))
    code = """
import json, sys, boto3
s3 = boto3.client("s3", endpoint_url="http://minio:9000")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
key = next(k for k in keys if k.endswith("notes/hello.txt"))
print(json.dumps({"key": key, "body": s3.get_object(Bucket="mlflow", Key=key)["Body"].read().decode()}))
"""
    got.update(_json(stack["ns"].python(code, stack["env"]("mlflow"))))
    assert got["uri"].startswith("mlflow-artifacts:/")  # the server proxies artifacts: clients need no S3 keys
    assert got["run_id"] in got["key"] and got["body"] == "hello from a ray node"
    conf = stack["services"]["postgres"]["environment"]
    code = ("import json, sys, psycopg\n"
            "c = psycopg.connect(host='postgres', user=sys.argv[1], password=sys.argv[2], dbname=sys.argv[3])\n"
            "cur = c.cursor(); cur.execute('select run_uuid from runs')\n"
            "print(json.dumps([r[0] for r in cur.fetchall()]))\n")
    runs = _json(stack["ns"].python(code, stack["base"], conf["POSTGRES_USER"], conf["POSTGRES_PASSWORD"],
                                    conf["POSTGRES_DB"]))
    assert got["run_id"] in runs


def test_mlflow_serves_the_ui_to_its_users_only_and_answers_its_service_name_only(stack):
    code = """
import base64, json, sys, urllib.request, urllib.error
def status(path, host, login=(sys.argv[1], sys.argv[2])):
    headers = {"Host": host}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    request = urllib.request.Request("http://mlflow:5000" + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
api = "/api/2.0/mlflow/experiments/search?max_results=1"
ui = status("/", "localhost:5000")
print(json.dumps({"ui": ui[0], "html": "<html" in ui[1].lower(), "mlflow": status(api, "mlflow:5000")[0],
                  "localhost": status(api, "localhost:5000")[0], "foreign": status(api, "evil.example")[0],
                  "anonymous api": status(api, "mlflow:5000", None)[0], "anonymous ui": status("/", "mlflow:5000", None)[0],
                  "wrong password": status(api, "mlflow:5000", (sys.argv[1], "guess"))[0],
                  "health": status("/health", "mlflow:5000", None)[0]}))
"""
    login = "admin", SECRETS["MLFLOW_ADMIN_PASSWORD"]
    got = _json(stack["ns"].python(code, stack["base"], *login))
    assert got == {"ui": 200, "html": True, "mlflow": 200, "localhost": 200, "foreign": 403,
                   "anonymous api": 401, "anonymous ui": 401, "wrong password": 401, "health": 200}


def test_an_mlflow_client_without_the_login_is_refused(stack):
    # A Ray node's environment, less the login: what anyone else who reaches port 5000 would have.
    env = {k: v for k, v in stack["env"]("ray-worker").items() if not k.startswith("MLFLOW_TRACKING_USER")
           and k != "MLFLOW_TRACKING_PASSWORD"}
    code = "import mlflow; mlflow.MlflowClient().search_experiments()"
    out = stack["ns"].python(code, {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert out.returncode != 0 and "401" in out.stderr, out.stderr[-2000:]


def test_ray_head_and_worker_form_one_cluster(stack):
    # Only the auth settings come along: tasks must get MLFLOW_TRACKING_URI from their node's environment.
    node_env = stack["env"]("ray-worker")
    env = {**stack["base"], **{k: node_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")}}
    address = stack["services"]["ray-worker"]["command"][2].split("=", 1)[1]
    code = RAY_ADDRESS_CODE + """
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id(), os.environ.get("MLFLOW_TRACKING_URI")
seen = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in alive], timeout=60)
print(json.dumps({"alive": sorted(n["NodeID"] for n in alive), "seen": seen}))
"""
    got = _json(stack["ns"].python(code, env, address, timeout=150))
    assert len(got["alive"]) == 2, got
    assert sorted(node for node, _ in got["seen"]) == got["alive"]
    assert {uri for _, uri in got["seen"]} == {"http://mlflow:5000"}
    assert stack["worker"].poll() is None


# ---------------------------------------------------------------------------------------------
# docs/deploy.md's "Without Docker", run as written


def _native_section() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    start = text.index("## Without Docker")
    return text[start:text.index("\n## ", start + 3)]


def _native_steps() -> list[str]:
    """The blocks headed `# step N`, in order; the numbers must run 1, 2, ... so none is skipped."""
    steps = [(int(m.group(1)), block) for block in re.findall(r"```bash\n(.*?)```", _native_section(), re.S)
             if (m := re.match(r"# step (\d+)\b", block))]
    assert [n for n, _ in steps] == list(range(1, len(steps) + 1)), [n for n, _ in steps]
    return [block for _, block in steps]


def _env_file(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _listeners(ns: Namespace) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of the namespace's processes; "0.0.0.0" for
    all interfaces (IPv4 or IPv6 wildcard), IPv4-mapped IPv6 addresses as IPv4."""
    sockets = {}
    for family in ("tcp", "tcp6"):
        for line in Path(f"/proc/{ns.holder.pid}/net/{family}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if family == "tcp":
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                addr = "0.0.0.0" if addr == "::" else addr.removeprefix("::ffff:")
            sockets[fields[9]] = (addr, int(port_hex, 16))
    found = []
    for pid in ns.pids():
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found += [(pid, *sockets[link[8:-1]]) for link in links
                  if link.startswith("socket:[") and link[8:-1] in sockets]
    return sorted(set(found))


BINDS = {"all interfaces": {"0.0.0.0"}, "loopback": {"127.0.0.1"},
         "the host's address and loopback": {"10.0.0.5", "127.0.0.1"}}


def _documented_binds() -> dict[int, set[str]]:
    """The table of "Ray's ports natively": port -> the addresses it listens on."""
    section = _native_section()
    table = section[section.index("### Ray's ports natively"):]
    rows = re.findall(r"^\| [^|]+ \| `(\d+)`[^|]* \| ([^|]+?) \|", table, re.M)
    assert rows, "docs/deploy.md should list what the native processes listen on"
    for _, where in rows:
        assert where in BINDS, where
    return {int(port): BINDS[where] for port, where in rows}


def _is_ray(pid: int) -> bool:
    """A process of Ray's: its servers, agents and workers, or a Ray driver (the sweep)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return True  # gone since: nothing to check
    return name in {"gcs_server", "raylet"} or name.startswith("ray::") or "/ray/" in argv \
        or "ray.util.client.server" in argv or "sae-registry\0sweep" in argv


def test_the_native_section_of_the_docs_runs_as_written_on_a_two_node_cluster(tmp_path_factory):
    """Every `# step N` block of docs/deploy.md's "Without Docker", run in order as written with the
    stand-ins of the blocks it does not run: secrets, buckets and users, MLflow with its node user,
    a Ray head and worker, a harvest into the bucket and a sweep submitted with `ray job submit`;
    then the registry holds the sweep's versions with their lineage and a champion that loads by
    name, nothing listens beyond what the docs say, and no secret is on a command line."""
    if os.geteuid() != 0:
        pytest.skip("runs the services in a private network namespace: needs root")
    steps = _native_steps()
    root = Path(tempfile.mkdtemp(prefix="sae-native-", dir="/tmp"))
    root.chmod(0o711)
    home = root / "home"
    home.mkdir()
    bindir, mc_log = _fake_mc(root)
    env = {"PATH": f"{bindir}:{BIN}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "MC_LOG": str(mc_log),
           "HF_HUB_OFFLINE": "1"}
    # Ray keeps its sockets and sessions under /tmp/ray: a private one, so no other Ray on this host interferes.
    Path("/tmp/ray").mkdir(exist_ok=True)
    (root / "ray").mkdir()
    ns = Namespace(root, ["postgres", "minio", "mlflow"], binds={root / "ray": Path("/tmp/ray")},
                   external="10.0.0.5/24")
    deploy = home / "sae-deploy"

    def step(n: int, timeout: float, own_ray_dir: Path | None = None) -> None:
        log = root / f"step-{n}.log"
        argv = ["bash", "-euo", "pipefail", "-c", steps[n - 1]]
        if own_ray_dir is not None:
            # A node of its own /tmp/ray, as on another machine: two nodes sharing one re-extract a
            # job's working directory under its running driver (a Ray quirk of one host, not ours).
            own_ray_dir.mkdir()
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f'mount --bind {own_ray_dir} /tmp/ray && exec "$@"', "sh", *argv]
        with open(log, "w") as out:
            proc = subprocess.run(ns.argv(argv, wd=ROOT), env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        assert proc.returncode == 0, f"step {n} failed:\n{steps[n - 1]}\n---\n{log.read_text()[-4000:]}"

    try:
        began = time.monotonic()
        step(1, 60)
        admin, node, client = (_env_file(deploy / f"{name}.env") for name in ("admin", "node", "client"))
        assert {p.name for p in deploy.iterdir()} >= {"admin.env", "mlflow.env", "node.env", "client.env"}
        assert all(p.stat().st_mode & 0o077 == 0 for p in deploy.glob("*.env"))  # readable by their owner only
        # the blocks the test does not run: PostgreSQL's role and database, and MinIO (moto here)
        _postgres(ns, {"environment": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": admin["POSTGRES_PASSWORD"],
                                       "POSTGRES_DB": "mlflow"}}, 5432, root, env)
        proc = ns.start("minio", [BIN / "moto_server", "-H", "127.0.0.1", "-p", "9000"], env, root)
        ns.wait_until("minio", proc, lambda: _answers_http(ns, "http://127.0.0.1:9000", env))
        for n, timeout in ((2, 120), (3, 300), (4, 180)):
            step(n, timeout)
        step(5, 180, own_ray_dir=root / "ray-worker")
        for n, timeout in ((6, 600), (7, 900)):
            step(n, timeout)
        elapsed = time.monotonic() - began
        print(f"\ndocumented native flow, nothing -> a registered champion on 2 nodes: {elapsed:.0f} s")

        # the users the steps made: limited MinIO users, a non-admin MLflow user that the nodes use
        calls = _mc_calls(mc_log)
        assert {c["name"]: c["secret"] for c in calls if c["op"] == "user"} == {
            "sae-mlflow": admin["MINIO_MLFLOW_PASSWORD"], "sae-node": node["AWS_SECRET_ACCESS_KEY"]}
        assert node["AWS_ACCESS_KEY_ID"] == "sae-node" and node["MLFLOW_TRACKING_USERNAME"] == "sae-node"
        assert admin["MINIO_ROOT_PASSWORD"] not in (deploy / "node.env").read_text() + (deploy / "client.env").read_text()

        # registration and lineage, seen from the client with its own environment only
        code = """
import json, mlflow, torch, sae_registry
c = mlflow.MlflowClient()
versions = c.search_model_versions("name='deploy-check'")
champion = c.get_model_version_by_alias("deploy-check", "champion")
runs = [c.get_run(v.run_id) for v in versions]
d = sae_registry.load("deploy-check@champion")
x = torch.randn(3, 384)  # MiniLM's width: the store the docs harvest
print(json.dumps({"versions": len(versions), "champion": champion.version,
                  "store": sorted({v.tags.get("store.path") for v in versions}),
                  "fingerprints": sorted({v.tags.get("store.fingerprint") for v in versions}),
                  "sweeps": sorted({v.tags.get("sweep.id", "") for v in versions}),
                  "nodes": sorted({r.data.tags.get("ray.node_id", "") for r in runs}),
                  "status": sorted({r.info.status for r in runs}),
                  "codes": list(d.encode(x).shape)}))
"""
        got = _json(ns.python(code, {**env, **client}, timeout=300))
        assert got["versions"] == 2 and got["champion"] in {"1", "2"}, got
        assert got["store"] == ["s3://activations/check.zarr"], got
        assert len(got["fingerprints"]) == 1 and got["fingerprints"][0], got
        assert len(got["sweeps"]) == 1 and got["sweeps"][0], got
        assert len(got["nodes"]) == 2 and all(got["nodes"]), got  # one trial on each node
        assert got["status"] == ["FINISHED"] and got["codes"] == [3, 256], got

        # the documented client needs RAY_AUTH_MODE=token as well as the token
        jobs = ["ray", "job", "list", "--address", "http://127.0.0.1:8265"]
        assert ns.run(jobs, {**env, **client}, timeout=120).returncode == 0
        no_mode = {k: v for k, v in client.items() if k != "RAY_AUTH_MODE"}
        refused = ns.run(jobs, {**env, **no_mode}, timeout=120)
        assert refused.returncode != 0, refused.stdout[-2000:]

        # no secret on any command line (world-readable), MLflow's server and its workers included
        secrets = {k: v for k, v in admin.items() if "PASSWORD" in k} | {"RAY_AUTH_TOKEN": node["RAY_AUTH_TOKEN"]}
        for pid in ns.pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert not [k for k, v in secrets.items() if v in argv], argv.replace("\0", " ")[:300]

        # what listens where, as the docs say (the namespace also has 10.0.0.5, an "external" address)
        seen = _listeners(ns)
        print("listening:", seen)
        documented = _documented_binds()
        for port, where in documented.items():
            assert {addr for _, addr, p in seen if p == port} == where, (port, where, seen)
        # beyond the documented ports, only Ray's own processes listen outside loopback
        stray = [(pid, addr, port) for pid, addr, port in seen
                 if port not in documented and addr != "127.0.0.1" and not _is_ray(pid)]
        assert not stray, stray
    finally:
        ns.stop()
        shutil.rmtree(root, ignore_errors=True)
