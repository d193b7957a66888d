"""The docker-compose deployment: compose files, their generator, Dockerfile, certificates.

``docker-compose config`` validates the files when docker-compose (or ``docker compose``)
is installed; in CI (``CI=true``) a missing docker-compose is a failure, not a skip. The
structure (services, node configs, pinned images, read-only data) is checked with PyYAML
on the committed files and on the generator's output for other silo counts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simulations import deploy

ROOT = Path(__file__).resolve().parents[2]
FLWR_VERSION = importlib.metadata.version("flwr")
SUPERLINK_PORT = 8000


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_compose", ROOT / "deploy" / "make_compose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_compose = _load_generator()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _require(tool: str) -> None:
    if _in_ci():
        pytest.fail(f"{tool} is required in CI (apt-get install {tool})")
    pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    _require("docker-compose")


def _option(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _node_config(command: list[str]) -> dict[str, int]:
    pairs = dict(kv.split("=", 1) for kv in shlex.split(_option(command, "--node-config")))
    return {k: int(v) for k, v in pairs.items()}


def _image_ok(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "$" not in tag, f"image not pinned: {image}"
    if name.startswith("flwr/"):
        assert tag == FLWR_VERSION, f"{image}: the Flower images must match flwr {FLWR_VERSION}"


def _volumes(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):  # rendered long syntax
            out.append(f"{v['source']}:{v['target']}" + (":ro" if v.get("read_only") else ""))
        else:
            out.append(v)
    return out


def check_structure(doc: dict, silos: int, *, tls: bool = False) -> None:
    services = doc["services"]
    expected = {"superlink", "superexec-serverapp"}
    expected |= {f"supernode-{i}" for i in range(1, silos + 1)}
    expected |= {f"superexec-clientapp-{i}" for i in range(1, silos + 1)}
    assert set(services) == expected

    for name, svc in services.items():
        assert "image" in svc, name
        _image_ok(svc["image"])
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR_VERSION}"

    # SuperLink: process isolation, one API on 8000, state in a named volume
    link = services["superlink"]
    cmd = [str(c) for c in link["command"]]
    assert _option(cmd, "--isolation") == "process"
    assert _option(cmd, "--port") == str(SUPERLINK_PORT) and _option(cmd, "--host") == "0.0.0.0"
    assert "--disable-runtime-dependency-installation" in cmd
    database = _option(cmd, "--database")
    mounts = [v.split(":") for v in _volumes(link)]
    assert any(
        src in doc.get("volumes", {}) and database.startswith(dst.rstrip("/") + "/")
        for src, dst, *_ in mounts
    )
    if tls:
        assert "--insecure" not in cmd
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
            assert _option(cmd, flag).startswith("/certificates/")
    else:
        assert "--insecure" in cmd

    # ServerApp process
    srv = services["superexec-serverapp"]
    cmd = [str(c) for c in srv["command"]]
    assert _option(cmd, "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    assert ("--insecure" not in cmd and "--root-certificates" in cmd) if tls else "--insecure" in cmd
    assert "plugin-type" not in " ".join(cmd)  # deprecated and ignored in Flower 1.42

    # SuperNodes: distinct partitions 0..N-1 of N, distinct runtime ports
    ports, parts = set(), set()
    for i in range(1, silos + 1):
        node = services[f"supernode-{i}"]
        assert node["image"] == f"flwr/supernode:{FLWR_VERSION}"
        cmd = [str(c) for c in node["command"]]
        assert _option(cmd, "--superlink") == f"superlink:{SUPERLINK_PORT}"
        assert _option(cmd, "--isolation") == "process"
        conf = _node_config(cmd)
        assert conf["num-partitions"] == silos
        parts.add(conf["partition-id"])
        port = int(_option(cmd, "--port"))
        ports.add(port)
        if tls:
            assert "--insecure" not in cmd and _option(cmd, "--root-certificates") == "/certificates/ca.crt"
        else:
            assert "--insecure" in cmd
        # its ClientApp process talks to this SuperNode
        app = services[f"superexec-clientapp-{i}"]
        assert _option([str(c) for c in app["command"]], "--runtime-api-address") == f"supernode-{i}:{port}"
    assert parts == set(range(silos)) and len(ports) == silos

    # App images: built from the Dockerfile, data read-only at /data
    for name in ["superexec-serverapp"] + [f"superexec-clientapp-{i}" for i in range(1, silos + 1)]:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["environment"]["ADADPIGU_DATA_DIR"] == "/data"
        data = [v for v in _volumes(svc) if re.search(r":/data(:ro|:rw)?$", v)]
        assert len(data) == 1 and data[0].endswith(":/data:ro"), _volumes(svc)


def merge_tls(base: dict, override: dict) -> dict:
    """What compose does with -f base -f override for these files (command replaced, lists merged)."""
    merged = {**base, "services": {k: dict(v) for k, v in base["services"].items()}}
    for name, svc in override["services"].items():
        merged["services"][name].update(svc)
    merged["secrets"] = override.get("secrets", {})
    return merged


def _silos_of(doc: dict) -> int:
    return sum(1 for name in doc["services"] if name.startswith("supernode-"))


# ----- committed files ------------------------------------------------------------------------


def test_committed_files_are_the_generator_output():
    base = (ROOT / "docker-compose.yml").read_text()
    silos = _silos_of(yaml.safe_load(base))
    assert silos in (2, 3)
    assert base == make_compose.compose(silos), (
        "regenerate: python deploy/make_compose.py -o docker-compose.yml"
    )
    tls = (ROOT / "docker-compose.tls.yml").read_text()
    assert tls == make_compose.compose_tls(silos), (
        "regenerate: python deploy/make_compose.py --tls -o docker-compose.tls.yml"
    )


def test_committed_structure():
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    silos = _silos_of(base)
    check_structure(base, silos)
    tls = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    check_structure(merge_tls(base, tls), silos, tls=True)
    assert set(tls["secrets"]) == {"superlink-ca-certfile", "superlink-certfile", "superlink-keyfile"}


@pytest.mark.parametrize("silos", [1, 3, 5])
def test_generator_structure(silos):
    base = yaml.safe_load(make_compose.compose(silos))
    assert sum(name.startswith("supernode-") for name in base["services"]) == silos
    check_structure(base, silos)
    check_structure(merge_tls(base, yaml.safe_load(make_compose.compose_tls(silos))), silos, tls=True)


@pytest.mark.parametrize("silos", [2, 3])
def test_own_data_gives_each_clientapp_its_own_folder_and_the_server_none(silos):
    """--own-data (issue 26): silo i's ClientApp mounts ADADPIGU_SILO_DATA_i read-only at /data and
    no other container mounts it; the ServerApp mounts the coordinator's folder, no silo's."""
    doc = yaml.safe_load(make_compose.compose(silos, own_data=True))
    check_structure(doc, silos)
    services = doc["services"]
    for i in range(1, silos + 1):
        own = f"${{ADADPIGU_SILO_DATA_{i}:-./silos/silo-{i - 1}}}:/data:ro"
        holders = [name for name, svc in services.items() if own in _volumes(svc)]
        assert holders == [f"superexec-clientapp-{i}"]
    assert (
        _volumes(services["superexec-serverapp"])[0] == "${ADADPIGU_SERVER_DATA_DIR:-./server-data}:/data:ro"
    )
    assert not any("ADADPIGU_DATA_DIR:-" in v for svc in services.values() for v in _volumes(svc))


def test_generator_cli(tmp_path):
    out = tmp_path / "c.yml"
    assert make_compose.main(["--silos", "4", "-o", str(out)]) == 0
    check_structure(yaml.safe_load(out.read_text()), 4)
    with pytest.raises(SystemExit):
        make_compose.main(["--silos", "0"])


def test_dockerfile_pins_versions():
    text = (ROOT / "Dockerfile").read_text()
    arg = re.search(r"^ARG FLWR_IMAGE_TAG=(\S+)$", text, re.M)
    assert arg and arg.group(1) == FLWR_VERSION
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_IMAGE_TAG\}$", text, re.M)
    readme = (ROOT / "README.md").read_text()
    pins = re.search(r"pip install (torch==\S+) (torchvision==\S+)", readme)
    assert pins and f"{pins.group(1)} {pins.group(2)}" in text  # same torch pair as the README
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    assert "ADADPIGU_DATA_DIR=/data" in text


# ----- docker-compose config ----------------------------------------------------------------


def _config(compose_cmd: list[str], files: list[Path], env: dict[str, str]) -> dict:
    cmd = [*compose_cmd, "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    proc = subprocess.run(
        [*cmd, "config"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


def test_docker_compose_config_base_and_tls(compose_cmd, tmp_path):
    env = {"ADADPIGU_DATA_DIR": str(tmp_path / "data"), "ADADPIGU_CERTS_DIR": str(tmp_path / "certs")}
    base = _config(compose_cmd, [ROOT / "docker-compose.yml"], env)
    silos = _silos_of(base)
    check_structure(base, silos)
    data = _volumes(base["services"]["superexec-clientapp-1"])
    assert f"{tmp_path / 'data'}:/data:ro" in data  # the host folder comes from $ADADPIGU_DATA_DIR
    tls = _config(compose_cmd, [ROOT / "docker-compose.yml", ROOT / "docker-compose.tls.yml"], env)
    check_structure(tls, silos, tls=True)
    assert tls["secrets"]["superlink-keyfile"]["file"] == str(tmp_path / "certs" / "server.key")


def test_docker_compose_config_generated_silos(compose_cmd, tmp_path):
    for silos in (1, 4):
        base, over = tmp_path / f"c{silos}.yml", tmp_path / f"c{silos}.tls.yml"
        base.write_text(make_compose.compose(silos))
        over.write_text(make_compose.compose_tls(silos))
        rendered = _config(compose_cmd, [base], {})
        assert "superlink" in rendered["services"]
        check_structure(rendered, silos)
        check_structure(_config(compose_cmd, [base, over], {}), silos, tls=True)


# ----- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if not shutil.which("openssl"):
        _require("openssl")
    out = tmp_path_factory.mktemp("certs")
    env = {**os.environ, "ADADPIGU_CERT_BITS": "2048"}
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "gen_certs.sh"), "-o", str(out), "--san", "DNS:fl.example.org"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_gen_certs(certs):
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        assert (certs / name).is_file(), name
    assert (certs / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    ).stdout
    for want in ("DNS:superlink", "DNS:localhost", "IP Address:127.0.0.1", "DNS:fl.example.org"):
        assert want in san, san
    again = subprocess.run(
        ["bash", str(ROOT / "deploy" / "gen_certs.sh"), "-o", str(certs)], capture_output=True
    )
    assert again.returncode == 1  # never replaces a CA silently


def test_tls_supernode_connects_with_generated_certificates(certs, tmp_path):
    """The flags of docker-compose.tls.yml, on loopback: a SuperNode registers over TLS."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # the SuperLink spawns flower-superexec by name: the venv's bin even when not activated
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    link_port, node_port = deploy.free_port(), deploy.free_port()
    tracker = deploy.ProcessTracker()
    try:
        link = deploy._Managed(
            "superlink",
            [deploy._flower_bin("flower-superlink"), "--disable-runtime-dependency-installation"]
            + ["--port", str(link_port), "--ssl-ca-certfile", str(certs / "ca.crt")]
            + ["--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key")],
            tmp_path / "superlink.log",
            env,
            str(tmp_path),
        )
        tracker.add(link)
        deadline = time.monotonic() + 90
        deploy._wait_ready(link, "127.0.0.1", link_port, deadline, "flower-superlink")
        node = deploy._Managed(
            "supernode",
            [deploy._flower_bin("flower-supernode"), "--superlink", f"localhost:{link_port}"]
            + ["--root-certificates", str(certs / "ca.crt"), "--port", str(node_port)]
            + ["--node-config", "partition-id=0 num-partitions=1"],
            tmp_path / "supernode.log",
            env,
            str(tmp_path),
        )
        tracker.add(node)
        while "SuperNode ID" not in (tmp_path / "supernode.log").read_text(errors="replace"):
            assert node.poll() is None, node.tail()
            assert time.monotonic() < deadline, node.tail()
            time.sleep(0.3)
        tracker.scan()
    finally:
        left = tracker.stop_all(grace=5)
    assert not left
    assert "insecure" not in (tmp_path / "supernode.log").read_text().lower()
