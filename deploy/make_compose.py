#!/usr/bin/env python3
"""Write the docker-compose files for N silos (Flower 1.42 deployment runtime).

    python deploy/make_compose.py --silos 2 -o docker-compose.yml          # the committed file
    python deploy/make_compose.py --silos 2 --tls -o docker-compose.tls.yml  # its TLS override
    python deploy/make_compose.py --silos 5 -o compose-5.yml                 # five silos
    python deploy/make_compose.py --silos 2 --tls --auth -o docker-compose.tls-auth.yml
                                      # TLS override with SuperNode authentication (see below)
    python deploy/make_compose.py --silos 3 --own-data -o compose-own.yml
                                      # each silo mounts its own data folder (see below)

The topology follows Flower's own compose layout (framework/docker/complete): a SuperLink
with ``--isolation process``, a ``flower-superexec`` service that runs the ServerApp
against the SuperLink's runtime API, one SuperNode per silo with
``--node-config "partition-id=i num-partitions=N"``, and one ``flower-superexec`` service
per SuperNode that runs its ClientApp. The superexec services use the app image built
from ``Dockerfile``; the data folder is mounted read-only at ``/data``.

With ``--own-data`` every silo's ClientApp mounts its *own* folder read-only at ``/data``
(``${ADADPIGU_SILO_DATA_<i>:-./silos/silo-<i-1>}``: one dataset in any format of
docs/DATA.md, with its ``silo.toml`` and a copy of the schema), and no other container sees
it; the ServerApp mounts ``${ADADPIGU_SERVER_DATA_DIR:-./server-data}`` (the coordinator's
own files: its copy of the schema, an optional test set) instead of any silo's data.

With ``--auth`` the TLS override also turns on Flower's CLI-managed SuperNode
authentication: the SuperLink runs with ``--enable-supernode-auth`` and accepts only
SuperNodes whose public keys were registered with ``flwr supernode register``; SuperNode
*i* signs its requests with the private key ``supernode-i`` of
``${ADADPIGU_SUPERNODE_KEYS_DIR:-./deploy/keys}`` (``deploy/gen_supernode_keys.sh``). A
registered key keeps its node ID, so a SuperNode that restarts comes back as the same node.

The output is plain text (with comments), deterministic, and needs only the standard
library, so ``tests/test_compose.py`` can check that the committed files are up to date.
"""

from __future__ import annotations

import argparse
import sys

FLWR_VERSION = "1.42.0"
APP_IMAGE = "adadpigu-fl-superexec:0.1.0"
SUPERLINK_PORT = 8000
BASE_SUPERNODE_PORT = 9094
CERT_DIR = "/certificates"
DATA_MOUNT = "${ADADPIGU_DATA_DIR:-./data}:/data:ro"
SERVER_DATA_MOUNT = "${ADADPIGU_SERVER_DATA_DIR:-./server-data}:/data:ro"


def silo_data_mount(i: int) -> str:
    """Silo ``i``'s (1-based) own data folder, mounted into its ClientApp only."""
    return f"${{ADADPIGU_SILO_DATA_{i}:-./silos/silo-{i - 1}}}:/data:ro"


def _list(items: list[str], indent: int) -> str:
    pad = " " * indent
    return "".join(f"{pad}- {item}\n" for item in items)


def _q(value: str) -> str:
    """Quote a scalar for YAML when it is not a plain word."""
    plain = value.replace("-", "").replace("_", "").replace(".", "").replace(":", "").replace("/", "")
    if plain.isalnum() and not value.isdigit() and value not in ("true", "false", "null", "yes", "no"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def supernode_port(i: int) -> int:
    """Runtime API port of SuperNode ``i`` (1-based), as in Flower's compose files."""
    return BASE_SUPERNODE_PORT + i - 1


KEYS_DIR = "${ADADPIGU_SUPERNODE_KEYS_DIR:-./deploy/keys}"
KEY_DIR = "/supernode-keys"


def superlink_command(tls: bool, auth: bool = False) -> list[str]:
    if auth and not tls:
        raise ValueError(
            "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)"
        )
    cmd = [] if tls else ["--insecure"]
    cmd += ["--isolation", "process", "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT)]
    cmd += ["--database", "/app/state.db", "--disable-runtime-dependency-installation"]
    if tls:
        cmd += [
            "--ssl-ca-certfile",
            f"{CERT_DIR}/ca.crt",
            "--ssl-certfile",
            f"{CERT_DIR}/server.pem",
            "--ssl-keyfile",
            f"{CERT_DIR}/server.key",
        ]
    if auth:
        cmd += ["--enable-supernode-auth"]
    return cmd


def supernode_command(i: int, silos: int, tls: bool, auth: bool = False) -> list[str]:
    if auth and not tls:
        raise ValueError("SuperNode authentication needs TLS")
    cmd = ["--root-certificates", f"{CERT_DIR}/ca.crt"] if tls else ["--insecure"]
    if auth:
        cmd += ["--auth-supernode-private-key", f"{KEY_DIR}/supernode-{i}"]
    cmd += ["--superlink", f"superlink:{SUPERLINK_PORT}"]
    cmd += ["--host", "0.0.0.0", "--port", str(supernode_port(i)), "--isolation", "process"]
    cmd += ["--node-config", f"partition-id={i - 1} num-partitions={silos}"]
    return cmd


def serverapp_command(tls: bool) -> list[str]:
    cmd = ["--root-certificates", f"{CERT_DIR}/ca.crt"] if tls else ["--insecure"]
    return cmd + ["--runtime-api-address", f"superlink:{SUPERLINK_PORT}"]


def clientapp_command(i: int) -> list[str]:
    # The ClientApp talks to its own SuperNode inside the compose network (plain HTTP,
    # also in the TLS variant: only the SuperLink's API crosses machines).
    return ["--insecure", "--runtime-api-address", f"supernode-{i}:{supernode_port(i)}"]


def _app_service(
    name: str,
    command: list[str],
    depends: str,
    extra_volumes: list[str],
    comment: str,
    data: str = DATA_MOUNT,
) -> str:
    return (
        f"  # {comment}\n"
        f"  {name}:\n"
        "    build:\n"
        "      context: .\n"
        "      dockerfile: Dockerfile\n"
        f"    image: {APP_IMAGE}\n"
        "    command:\n"
        f"{_list([_q(c) for c in command], 6)}"
        "    environment:\n"
        "      ADADPIGU_DATA_DIR: /data\n"
        "    volumes:\n"
        f"{_list([data, *extra_volumes], 6)}"
        "    stop_signal: SIGINT\n"
        "    restart: on-failure:3\n"
        "    depends_on:\n"
        f"      - {depends}\n"
    )


def compose(silos: int, own_data: bool = False) -> str:
    """The insecure base file for ``silos`` SuperNodes (``own_data``: one data folder per silo)."""
    if silos < 1:
        raise ValueError("silos must be >= 1")
    data_line = (
        "# Data: each silo's own folder ${ADADPIGU_SILO_DATA_<i>:-./silos/silo-<i-1>} is mounted read-only at\n"
        "# /data in its ClientApp only; the ServerApp gets ${ADADPIGU_SERVER_DATA_DIR:-./server-data}.\n"
        if own_data
        else "# Data: ${ADADPIGU_DATA_DIR:-./data} (torchvision layout) is mounted read-only at /data.\n"
    )
    flag = " --own-data" if own_data else ""
    out = [
        f"# adadpigu-fl on Flower {FLWR_VERSION}'s deployment runtime: SuperLink, ServerApp, {silos} silos.\n"
        f"# Generated by `python deploy/make_compose.py --silos {silos}{flag}`: edit the generator, not this file.\n"
        "# Start: docker compose up --build -d, then submit from the host with\n"
        "#   flwr run . adadpigu-docker --stream   (connection in $FLWR_HOME/config.toml, docs/DEPLOY.md)\n"
        "# TLS: deploy/gen_certs.sh, then add -f docker-compose.tls.yml.\n"
        f"{data_line}"
        "\n"
        "services:\n"
        "  # The SuperLink: one HTTP API (Fleet, Control, Runtime) on port 8000; state in a named\n"
        "  # volume (mounted at /app, the home of the image's `app` user, so that it is writable).\n"
        "  superlink:\n"
        f"    image: flwr/superlink:{FLWR_VERSION}\n"
        "    command:\n"
        f"{_list([_q(c) for c in superlink_command(False)], 6)}"
        "    ports:\n"
        f'      - "${{ADADPIGU_SUPERLINK_PORT:-{SUPERLINK_PORT}}}:{SUPERLINK_PORT}"\n'
        "    volumes:\n"
        "      - superlink-state:/app\n"
        "    restart: unless-stopped\n"
        "\n",
        _app_service(
            "superexec-serverapp",
            serverapp_command(False),
            "superlink",
            ["runs:/app/runs"],
            "Runs the ServerApp of each submitted run (flower-superexec, SuperLink's runtime API);\n"
            "  # run folders (out-dir `runs`, relative to /app) are kept in the `runs` volume",
            data=SERVER_DATA_MOUNT if own_data else DATA_MOUNT,
        ),
    ]
    for i in range(1, silos + 1):
        out.append(
            "\n"
            f"  # Silo {i} of {silos}: its SuperNode (connects to the SuperLink) ...\n"
            f"  supernode-{i}:\n"
            f"    image: flwr/supernode:{FLWR_VERSION}\n"
            "    command:\n"
            f"{_list([_q(c) for c in supernode_command(i, silos, False)], 6)}"
            "    restart: unless-stopped\n"
            "    depends_on:\n"
            "      - superlink\n"
            "\n"
        )
        out.append(
            _app_service(
                f"superexec-clientapp-{i}",
                clientapp_command(i),
                f"supernode-{i}",
                [],
                f"... and the process that runs its ClientApp (reads /data, partition {i - 1} of {silos})"
                if not own_data
                else f"... and the process that runs its ClientApp (reads its own folder at /data, silo {i - 1})",
                data=silo_data_mount(i) if own_data else DATA_MOUNT,
            )
        )
    out.append("\nvolumes:\n  superlink-state:\n  runs:\n")
    return "".join(out)


def compose_tls(silos: int, auth: bool = False) -> str:
    """Override file: TLS between SuperNodes/ServerApp/flwr CLI and the SuperLink (with
    ``auth``, also CLI-managed SuperNode authentication)."""
    if silos < 1:
        raise ValueError("silos must be >= 1")
    ca = "      - source: superlink-ca-certfile\n        target: /certificates/ca.crt\n"
    flags = " --tls --auth" if auth else " --tls"
    header = [
        f"# TLS for docker-compose.yml ({silos} silos): certificates from deploy/gen_certs.sh\n"
        f"# (default folder ./deploy/certs, or $ADADPIGU_CERTS_DIR). Generated by\n"
        f"# `python deploy/make_compose.py --silos {silos}{flags}`: edit the generator, not this file.\n"
    ]
    if auth:
        header.append(
            "# SuperNode authentication: only SuperNodes whose public keys were registered with\n"
            "# `flwr supernode register <key>.pub` may connect; supernode-i signs with the private\n"
            "# key ${ADADPIGU_SUPERNODE_KEYS_DIR:-./deploy/keys}/supernode-i (deploy/gen_supernode_keys.sh).\n"
            "# Start the SuperLink, register the keys, then start the rest (docs/DEPLOY.md).\n"
        )
    out = [
        *header,
        f"#   docker compose -f docker-compose.yml -f docker-compose.tls{'-auth' if auth else ''}.yml up --build -d\n"
        "# The files must be readable by the images' `app` user (uid 49999), see docs/DEPLOY.md.\n"
        "\n"
        "services:\n"
        "  superlink:\n"
        "    command:\n"
        f"{_list([_q(c) for c in superlink_command(True, auth)], 6)}"
        "    secrets:\n"
        f"{ca}"
        "      - source: superlink-certfile\n        target: /certificates/server.pem\n"
        "      - source: superlink-keyfile\n        target: /certificates/server.key\n"
        "\n"
        "  superexec-serverapp:\n"
        "    command:\n"
        f"{_list([_q(c) for c in serverapp_command(True)], 6)}"
        "    secrets:\n"
        f"{ca}",
    ]
    for i in range(1, silos + 1):
        key = f"      - source: supernode-{i}-key\n        target: {KEY_DIR}/supernode-{i}\n" if auth else ""
        out.append(
            "\n"
            f"  supernode-{i}:\n"
            "    command:\n"
            f"{_list([_q(c) for c in supernode_command(i, silos, True, auth)], 6)}"
            "    secrets:\n"
            f"{ca}{key}"
        )
    out.append(
        "\n"
        "secrets:\n"
        "  superlink-ca-certfile:\n"
        "    file: ${ADADPIGU_CERTS_DIR:-./deploy/certs}/ca.crt\n"
        "  superlink-certfile:\n"
        "    file: ${ADADPIGU_CERTS_DIR:-./deploy/certs}/server.pem\n"
        "  superlink-keyfile:\n"
        "    file: ${ADADPIGU_CERTS_DIR:-./deploy/certs}/server.key\n"
    )
    if auth:
        out.extend(f"  supernode-{i}-key:\n    file: {KEYS_DIR}/supernode-{i}\n" for i in range(1, silos + 1))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=2, help="number of SuperNodes (default 2)")
    parser.add_argument("--tls", action="store_true", help="write the TLS override file instead")
    parser.add_argument(
        "--auth", action="store_true", help="with --tls: SuperNode authentication (registered public keys)"
    )
    parser.add_argument(
        "--own-data",
        action="store_true",
        help="each silo mounts its own data folder (ADADPIGU_SILO_DATA_<i>)",
    )
    parser.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.silos < 1:
        parser.error("--silos must be >= 1")
    if args.auth and not args.tls:
        parser.error("--auth needs --tls (Flower's SuperNode authentication requires TLS)")
    text = (
        compose_tls(args.silos, auth=args.auth) if args.tls else compose(args.silos, own_data=args.own_data)
    )
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
