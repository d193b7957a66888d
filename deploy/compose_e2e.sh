#!/usr/bin/env bash
# End-to-end test of the container deployment (Dockerfile, docker-compose.yml,
# docker-compose.tls.yml) with Podman and docker-compose (CI runs --quick after the tests: .ci/run; docs/DEPLOY.md):
#
#   deploy/compose_e2e.sh [--quick | --full] [--keep-images DIR] [--require] [--logs DIR]
#
#   --quick  (default) 2 silos from the unchanged docker-compose.yml: a run with one SuperNode
#            stopped mid-round (and started again after the round), then a run on both silos
#            (the restarted one included); 3 silos with TLS (generated docker-compose.yml and
#            docker-compose.tls.yml for 3 silos, certificates from deploy/gen_certs.sh); 2 silos each
#            with its own data folder (Chem97 split by education authority with `adadpigu split`,
#            a compose file from make_compose.py --own-data, no central test set)
#   --full   also a 2-silo run before the fault, 3 silos without TLS, and the committed
#            2-silo TLS pair (docker-compose.yml + docker-compose.tls.yml)
#   --keep-images DIR  keep the engine's storage (images) in DIR for the next call, which
#            then skips the builds (for development; a clean run starts from nothing)
#   --require          fail (exit 1) where no container engine can be installed; without it
#            that case is a loud skip (exit 0), as docs/DEPLOY.md says
#   --logs DIR         where logs, timings and the checked run folders go
#                      (default runs/compose-e2e-<time>, git-ignored)
#
# What it does: installs the container tools with apt-get where missing (podman, runc,
# netavark, aardvark-dns, iptables, debootstrap, docker-compose); starts a private Podman
# (its own containers.conf, storage and network folders under a temporary directory, so that
# nothing else on the machine is touched but Podman's blob-info cache in /var/lib/containers,
# removed again where this script made it) and `podman system service` for docker-compose;
# pulls Flower's images docker.io/flwr/{superlink,supernode,superexec}:<version>, or where no
# registry answers builds stand-ins for them (deploy/flwr-standin/Dockerfile on a debootstrap'ed
# Debian); builds the app image from ./Dockerfile with `podman build`; brings the compose files
# up, submits short runs with `flwr run` and checks each run folder (deploy/check_run.py);
# tears everything down on exit, success or not (down -v, service stopped, storage removed).
#
# Needs: root (or sudo-less apt and rootful Podman), the flwr CLI of the pinned version on PATH
# (the project's venv), ADADPIGU_DATA_DIR with MNIST (torchvision layout), about 12 GB of disk.
# Builds behind a TLS-intercepting proxy: the host's CA bundle (E2E_CA_BUNDLE, default
# /etc/ssl/certs/ca-certificates.crt) is mounted into the build for pip, never copied into an
# image. The host's local pip sources (file:// indexes and find-links of `pip config list`) are
# mounted read-only into the build and tried first, so a wheel that is on disk is not downloaded.
# Environment: E2E_SCENARIOS (a subset of "basic2 fault2 tls3 plain3 tls2 auth2 own2"; --quick runs
# "fault2 tls3 own2", --full all), E2E_FLWR_IMAGES=standin|pull|auto (auto), E2E_DEBIAN_MIRROR, E2E_BUILD_ARGS
# (extra `podman build` arguments for the app image), E2E_STORAGE_DRIVER (overlay),
# E2E_OCI_RUNTIME (runc), E2E_RUN_TIMEOUT (seconds per `flwr run`, 600).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE=quick
KEEP_DIR=""
REQUIRE=0
LOGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick; shift ;;
    --full) MODE=full; shift ;;
    --keep-images) KEEP_DIR="$2"; shift 2 ;;
    --require) REQUIRE=1; shift ;;
    --logs) LOGS="$2"; shift 2 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "compose_e2e.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

FLWR_VERSION="$(sed -n 's/^FLWR_VERSION = "\(.*\)"$/\1/p' "$ROOT/deploy/make_compose.py")"
APP_IMAGE="$(sed -n 's/^APP_IMAGE = "\(.*\)"$/\1/p' "$ROOT/deploy/make_compose.py")"
DATA="${ADADPIGU_DATA_DIR:-$ROOT/data}"
RUN_TIMEOUT="${E2E_RUN_TIMEOUT:-600}"
LOGS="${LOGS:-$ROOT/runs/compose-e2e-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$LOGS"
LOGS="$(cd "$LOGS" && pwd)"
T_START=$SECONDS
case "$MODE" in
  quick) SCENARIOS="${E2E_SCENARIOS:-fault2 tls3 own2}" ;;
  full) SCENARIOS="${E2E_SCENARIOS:-basic2 fault2 tls3 plain3 tls2 auth2 own2}" ;;
esac
want() { case " $SCENARIOS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

log() { printf '[e2e %4ds] %s\n' "$((SECONDS - T_START))" "$*" | tee -a "$LOGS/e2e.log"; }
die() { log "FAILED: $*"; exit 1; }

# ----- step timings ----------------------------------------------------------------------------
STEP_NAME=""
STEP_T0=0
step() {
  step_end
  STEP_NAME="$1"
  STEP_T0=$SECONDS
  log "--- $1"
}
step_end() {
  if [ -n "$STEP_NAME" ]; then
    printf '%s\t%d\n' "$STEP_NAME" "$((SECONDS - STEP_T0))" >>"$LOGS/timings.tsv"
    log "    $STEP_NAME: $((SECONDS - STEP_T0)) s"
    STEP_NAME=""
  fi
}

# ----- preconditions -----------------------------------------------------------------------------
[ -n "$FLWR_VERSION" ] && [ -n "$APP_IMAGE" ] || die "cannot read FLWR_VERSION/APP_IMAGE from deploy/make_compose.py"
[ -f "$DATA/MNIST/raw/train-images-idx3-ubyte" ] || [ -f "$DATA/MNIST/raw/train-images-idx3-ubyte.gz" ] ||
  die "MNIST not found under ADADPIGU_DATA_DIR=$DATA (torchvision layout: MNIST/raw/...)"
DATA="$(cd "$DATA" && pwd)"
FLWR="$(command -v flwr || true)"
[ -n "$FLWR" ] || die "the flwr CLI is not on PATH (activate the project's venv)"
have_version="$("$FLWR" --version 2>/dev/null | grep -o '[0-9][0-9.]*' | head -1 || true)"
[ "$have_version" = "$FLWR_VERSION" ] || die "flwr CLI $have_version, the compose files pin $FLWR_VERSION"

# ----- container tools ---------------------------------------------------------------------------
step "install container tools"
TOOLS="podman runc netavark aardvark-dns iptables debootstrap docker-compose"
missing=""
for cmd in podman runc netavark debootstrap docker-compose iptables; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/lib/podman/$cmd" ] || missing="$missing $cmd"
done
if [ -n "$missing" ]; then
  log "missing:$missing; apt-get install $TOOLS"
  if command -v apt-get >/dev/null 2>&1 &&
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $TOOLS) >"$LOGS/apt.log" 2>&1; then
    log "installed $TOOLS"
  else
    msg="no container engine could be installed here (see $LOGS/apt.log): the compose e2e is SKIPPED"
    printf '\n%s\n!!! %s\n%s\n\n' "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" "$msg" "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    [ "$REQUIRE" -eq 1 ] && exit 1
    exit 0
  fi
fi

# ----- a private Podman ---------------------------------------------------------------------------
if [ -n "$KEEP_DIR" ]; then
  mkdir -p "$KEEP_DIR"
  WORK="$(cd "$KEEP_DIR" && pwd)"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/adadpigu-e2e.XXXXXX")"
fi
mkdir -p "$WORK/store" "$WORK/run" "$WORK/networks" "$WORK/tmp"
export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
export CONTAINERS_REGISTRIES_CONF="${CONTAINERS_REGISTRIES_CONF:-/etc/containers/registries.conf}"
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "${E2E_OCI_RUNTIME:-runc}"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"

[network]
network_backend = "netavark"
network_config_dir = "$WORK/networks"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "${E2E_STORAGE_DRIVER:-overlay}"
graphroot = "$WORK/store"
runroot = "$WORK/run"
EOF

# Podman keeps a blob-info cache in /var/lib/containers/cache whatever the storage root; the
# tear-down removes it again where this script made it
VARLIB_MADE=0
[ -e /var/lib/containers ] || VARLIB_MADE=1
SERVICE_PID=""
PROJECTS=()    # "name|-f a -f b" of every compose project brought up
cleanup() {
  local rc=$?
  set +e
  step_end
  trap - EXIT INT TERM
  log "--- tear-down (exit code $rc)"
  local t0=$SECONDS entry name files
  for entry in "${PROJECTS[@]}"; do
    name="${entry%%|*}"
    files="${entry#*|}"
    if [ "$rc" -ne 0 ]; then
      # shellcheck disable=SC2086
      compose "$name" $files logs --no-color >"$LOGS/$name.containers.log" 2>&1
    fi
    # shellcheck disable=SC2086
    timeout 180 compose "$name" $files down -v --remove-orphans >>"$LOGS/compose.log" 2>&1 ||
      log "down -v of $name failed (see $LOGS/compose.log)"
  done
  if [ -z "$KEEP_DIR" ]; then
    podman rm -af >/dev/null 2>&1
    podman rmi -af >/dev/null 2>&1
    podman system reset -f >/dev/null 2>&1
  fi
  if [ -n "$SERVICE_PID" ] && kill -0 "$SERVICE_PID" 2>/dev/null; then
    kill "$SERVICE_PID" 2>/dev/null
    wait "$SERVICE_PID" 2>/dev/null
  fi
  if [ -z "$KEEP_DIR" ]; then
    rm -rf "$WORK"
    [ "$VARLIB_MADE" -eq 1 ] && rm -rf /var/lib/containers
  else
    rm -rf "$WORK/certs" "$WORK/flwr-home" "$WORK"/compose-*.yml
  fi
  printf '%s\t%d\n' "tear-down" "$((SECONDS - t0))" >>"$LOGS/timings.tsv"
  printf '%s\t%d\n' "total" "$((SECONDS - T_START))" >>"$LOGS/timings.tsv"
  log "tear-down: $((SECONDS - t0)) s; total $((SECONDS - T_START)) s; logs in $LOGS"
  if [ "$rc" -eq 0 ]; then log "PASSED ($MODE)"; else log "FAILED ($MODE), exit code $rc"; fi
  column -t -s "$(printf '\t')" "$LOGS/timings.tsv" 2>/dev/null || cat "$LOGS/timings.tsv"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "start podman system service"
if ! podman info >"$LOGS/podman-info.txt" 2>&1; then
  if [ -z "${E2E_STORAGE_DRIVER:-}" ]; then
    log "podman with the overlay driver failed ($(tail -1 "$LOGS/podman-info.txt")); falling back to vfs (slow, ~3x the disk)"
    sed -i 's/^driver = .*/driver = "vfs"/' "$CONTAINERS_STORAGE_CONF"
    podman info >"$LOGS/podman-info.txt" 2>&1 || die "podman does not work here: $(tail -3 "$LOGS/podman-info.txt")"
  else
    die "podman does not work here: $(tail -3 "$LOGS/podman-info.txt")"
  fi
fi
SOCK="$WORK/podman.sock"
rm -f "$SOCK"
podman system service --time=0 "unix://$SOCK" >"$LOGS/podman-service.log" 2>&1 &
SERVICE_PID=$!
export DOCKER_HOST="unix://$SOCK"
for _ in $(seq 1 100); do
  [ -S "$SOCK" ] && curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
  kill -0 "$SERVICE_PID" 2>/dev/null || die "podman system service exited: $(tail -3 "$LOGS/podman-service.log")"
  sleep 0.2
done
curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null || die "podman system service does not answer on $SOCK"
log "podman $(podman --version | awk '{print $3}'), docker-compose $(docker-compose version --short), socket $SOCK"

compose() { # compose PROJECT [-f FILE]... ARGS...
  local name="$1"
  shift
  docker-compose -p "$name" --project-directory "$ROOT" "$@"
}

# ----- build-time pip sources: the host's local wheels first, its CA bundle for the proxy ---------
BUILD_VOLUMES=()
declare -A MOUNTED=()
mount_ro() { # mount_ro HOST_PATH [TARGET]: once per target
  local target="${2:-$1}"
  [ -n "${MOUNTED[$target]:-}" ] && return 0
  MOUNTED[$target]=1
  BUILD_VOLUMES+=(-v "$1:$target:ro")
}
pip_conf="$WORK/pip.conf"
{
  echo "[global]"
  echo "disable-pip-version-check = true"
  CA="${E2E_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
  if [ -f "$CA" ]; then
    echo "cert = /run/e2e/ca.crt"
    mount_ro "$CA" /run/e2e/ca.crt
  fi
  local_indexes=()
  links=()
  remote_index=""
  if command -v python3 >/dev/null; then
    while IFS='=' read -r key value; do
      value="${value#\'}"
      value="${value%\'}"
      for v in $value; do
        case "$key" in
          *find-links)
            p="${v#file://}"
            if [ -d "$p" ] && [ -z "${MOUNTED[$p]:-}" ]; then
              links+=("$p")
              mount_ro "$p"
            fi
            ;;
          *index-url)
            if [ "${v#file://}" != "$v" ] && [ -d "${v#file://}" ]; then
              p="${v#file://}"
              case " ${local_indexes[*]} " in *" $v "*) continue ;; esac
              local_indexes+=("$v")
              # relative links in a simple index point next to it (../../files/...)
              top="$p"
              [ "$(basename "$p")" = simple ] && top="$(dirname "$p")"
              mount_ro "$top"
            elif [ "${key##*.}" = "index-url" ] && [ "${key#*extra}" = "$key" ]; then
              remote_index="$v"
            fi
            ;;
        esac
      done
    done < <(python3 -m pip config list 2>/dev/null | grep -E '^(global|install|:env:)\.(index-url|extra-index-url|find-links)=' || true)
  fi
  remote_index="${remote_index:-https://pypi.org/simple}"
  if [ "${#local_indexes[@]}" -gt 0 ]; then
    # pip takes the first source that has the best candidate: the disk before the network
    echo "index-url = ${local_indexes[0]}"
    echo "extra-index-url = ${local_indexes[*]:1} $remote_index"
  fi
  [ "${#links[@]}" -gt 0 ] && echo "find-links = ${links[*]}"
} >"$pip_conf"
mount_ro "$pip_conf" /etc/pip.conf
cp "$pip_conf" "$LOGS/build-pip.conf"

# ----- Flower's images, or stand-ins -----------------------------------------------------------
have_image() { podman image exists "$1" 2>/dev/null; }
FLWR_IMAGES="${E2E_FLWR_IMAGES:-auto}"
step "Flower images"
if have_image "docker.io/flwr/superexec:$FLWR_VERSION" && have_image "docker.io/flwr/superlink:$FLWR_VERSION" &&
  have_image "docker.io/flwr/supernode:$FLWR_VERSION"; then
  log "Flower images present (kept from an earlier call)"
elif [ "$FLWR_IMAGES" != standin ] && timeout 300 podman pull -q "docker.io/flwr/superlink:$FLWR_VERSION" >"$LOGS/pull.log" 2>&1; then
  for c in supernode superexec; do
    timeout 600 podman pull -q "docker.io/flwr/$c:$FLWR_VERSION" >>"$LOGS/pull.log" 2>&1 || die "pulling flwr/$c failed"
  done
  log "pulled Flower's images $FLWR_VERSION"
else
  [ "$FLWR_IMAGES" = pull ] && die "cannot pull Flower's images: $(tail -1 "$LOGS/pull.log")"
  log "no registry ($(tail -1 "$LOGS/pull.log" 2>/dev/null | cut -c1-120)); building stand-ins"
  if ! have_image localhost/debian-base:bookworm; then
    mirror="${E2E_DEBIAN_MIRROR:-}"
    if [ -z "$mirror" ]; then
      mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *\(\S*debian\/\?\)$/\1/p' | head -1)"
      [ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(\[[^]]*\] \)\?\(\S*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)"
      mirror="${mirror:-http://deb.debian.org/debian}"
    fi
    log "debootstrap bookworm from $mirror"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" "$mirror" \
      >"$LOGS/debootstrap.log" 2>&1 || die "debootstrap failed: $(tail -3 "$LOGS/debootstrap.log")"
    tar -C "$WORK/rootfs" -c . | podman import - localhost/debian-base:bookworm >>"$LOGS/debootstrap.log" 2>&1 ||
      die "podman import of the base failed: $(tail -3 "$LOGS/debootstrap.log")"
    rm -rf "$WORK/rootfs"
  fi
  for c in superlink supernode superexec; do
    podman build --target "$c" --build-arg BASE_IMAGE=localhost/debian-base:bookworm \
      --build-arg FLWR_VERSION="$FLWR_VERSION" "${BUILD_VOLUMES[@]}" \
      -t "docker.io/flwr/$c:$FLWR_VERSION" "$ROOT/deploy/flwr-standin" >>"$LOGS/build-standin.log" 2>&1 ||
      die "building the stand-in flwr/$c failed: $(tail -5 "$LOGS/build-standin.log")"
  done
  log "stand-ins docker.io/flwr/{superlink,supernode,superexec}:$FLWR_VERSION built (Python $(podman run --rm --entrypoint python docker.io/flwr/superexec:"$FLWR_VERSION" -c 'import platform; print(platform.python_version())'))"
fi

step "build the app image (Dockerfile)"
# shellcheck disable=SC2086
podman build "${BUILD_VOLUMES[@]}" ${E2E_BUILD_ARGS:-} -t "$APP_IMAGE" -f "$ROOT/Dockerfile" "$ROOT" \
  >"$LOGS/build-app.log" 2>&1 || die "building $APP_IMAGE failed: $(tail -5 "$LOGS/build-app.log")"
log "$APP_IMAGE: $(podman image inspect "$APP_IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}'), $(grep -o 'flwr [0-9.]* torch [^ ]*' "$LOGS/build-app.log" | tail -1)"

# ----- helpers for the runs --------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Tiny plan: MNIST, 2000 training examples over the silos, RDP accounting, epsilon 8.
PLAN="importance-rounds=1 train-subset=2000 test-subset=500 batch-size=32 evaluate-every=2 epsilon=8.0 accountant='rdp' seed=0"
MIN_ACC=0.15        # 10 classes: chance is 0.10 (500 test examples: 0.15 is ~4 standard errors above)
MIN_ACC_FAULT=0.12  # runs that lost a silo for a while (and, with auth, got it back mid-run)

# up NAME SILOS plain|tls FILES... [-- SERVICES...]: bring a compose project up (all of it, or
# SERVICES) and point the flwr CLI at it; with all of it, wait for its SuperNodes
up() {
  local name="$1" silos="$2" tls="$3"
  shift 3
  local files=() services=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do files+=("$1"); shift; done
  [ $# -gt 0 ] && shift && services=("$@")
  [ -n "${PORT:-}" ] || PORT="$(free_port)"
  export ADADPIGU_SUPERLINK_PORT="$PORT" ADADPIGU_DATA_DIR="$DATA"
  case " ${PROJECTS[*]} " in *" $name|${files[*]} "*) ;; *) PROJECTS+=("$name|${files[*]}") ;; esac
  compose "$name" "${files[@]}" up -d --no-build "${services[@]}" >>"$LOGS/compose.log" 2>&1 ||
    die "compose up $name failed: $(tail -5 "$LOGS/compose.log")"
  export FLWR_HOME="$WORK/flwr-home"
  mkdir -p "$FLWR_HOME"
  local security="insecure = true"
  [ "$tls" = tls ] && security="root-certificates = \"$WORK/certs/ca.crt\""
  printf '[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "127.0.0.1:%s"\n%s\n' "$PORT" "$security" \
    >"$FLWR_HOME/config.toml"
  [ "${#services[@]}" -eq 0 ] || return 0
  wait_online "$name" "$silos"
}

wait_online() { # wait_online NAME N: until N SuperNodes are online (120 s)
  local online=0
  for _ in $(seq 1 120); do
    online="$(online_nodes)"
    [ "$online" -ge "$2" ] && break
    sleep 1
  done
  [ "$online" -ge "$2" ] || die "$1: only $online of $2 SuperNodes online after 120 s"
  log "$1: $2 SuperNodes online (SuperLink on 127.0.0.1:$PORT)"
}

online_nodes() {
  "$FLWR" supernode ls e2e --format json 2>/dev/null |
    python3 -c 'import json, sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin).get("nodes", [])))' 2>/dev/null ||
    echo 0
}

# submit NAME RUNCONFIG : flwr run in the background, its output in $LOGS/NAME.log
submit() {
  local name="$1" cfg="$2"
  : >"$LOGS/$name.log"
  (cd "$ROOT" && exec timeout "$RUN_TIMEOUT" "$FLWR" run . e2e --stream --run-config "$cfg") >"$LOGS/$name.log" 2>&1 &
  RUN_PID=$!
}

# finish NAME PROJECT CHECK-ARGS... : wait for the run, copy its folder out of the volume, check it
finish() {
  local name="$1" project="$2"
  shift 2
  local rc=0
  wait "$RUN_PID" || rc=$?
  [ "$rc" -eq 0 ] || die "$name: flwr run exited with $rc: $(grep -v absl "$LOGS/$name.log" | tail -5)"
  local run_dir
  run_dir="$(sed -n 's/.*\[done\].*; \(runs\/[^ ]*\)\s*$/\1/p' "$LOGS/$name.log" | tail -1)"
  [ -n "$run_dir" ] || die "$name: no [done] line in the run's log: $(grep -v absl "$LOGS/$name.log" | tail -5)"
  local ctr
  ctr="$(compose "$project" ${PROJECT_FILES} ps -q superexec-serverapp)"
  podman cp "$ctr:/app/$run_dir" "$LOGS/$name.run" >/dev/null || die "$name: cannot copy /app/$run_dir out"
  python3 "$ROOT/deploy/check_run.py" "$LOGS/$name.run" "$@" >"$LOGS/$name.check.json" 2>"$LOGS/$name.check.err" ||
    die "$name: run folder check failed: $(cat "$LOGS/$name.check.err")"
  log "$name: ok $(cat "$LOGS/$name.check.json")"
}

wait_log() { # wait_log FILE PATTERN SECONDS
  local i
  for i in $(seq 1 "$(($3 * 2))"); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    kill -0 "$RUN_PID" 2>/dev/null || { grep -q -- "$2" "$1" 2>/dev/null && return 0; return 1; }
    sleep 0.5
  done
  return 1
}

# ----- 2 silos: the committed docker-compose.yml, unchanged --------------------------------------
two_silos() {
  P2="e2e2"
  PROJECT_FILES="-f $ROOT/docker-compose.yml"
  PORT=""
  step "2 silos: compose up"
  # shellcheck disable=SC2086
  up "$P2" 2 plain $PROJECT_FILES

  if want basic2; then
    step "2 silos: run (2 rounds)"
    submit two-silos "num-server-rounds=2 $PLAN min-available-nodes=2 min-train-nodes=2"
    finish two-silos "$P2" --silos 2 --rounds 2 --min-accuracy "$MIN_ACC"
  fi

  if ! want fault2; then
    step "2 silos: compose down -v"
    # shellcheck disable=SC2086
    compose "$P2" $PROJECT_FILES down -v >>"$LOGS/compose.log" 2>&1 || die "down -v $P2 failed"
    unset 'PROJECTS[-1]'
    return 0
  fi

  step "2 silos: SuperNode 2 stopped mid-round, started again"
  # shellcheck disable=SC2086
  node2="$(compose "$P2" $PROJECT_FILES ps -q supernode-2)"
  seen="$(podman logs "$node2" 2>&1 | grep -c 'Receiving: train message' || true)"
  submit fault "num-server-rounds=3 $PLAN min-available-nodes=2 min-train-nodes=1 round-timeout=180.0"
  for _ in $(seq 1 240); do
    [ "$(podman logs "$node2" 2>&1 | grep -c 'Receiving: train message' || true)" -gt "$seen" ] && break
    kill -0 "$RUN_PID" 2>/dev/null || die "fault: the run ended before supernode-2 got its first train message"
    sleep 0.5
  done
  t_stop="$(date -u +%s)"
  # shellcheck disable=SC2086
  compose "$P2" $PROJECT_FILES stop supernode-2 >>"$LOGS/compose.log" 2>&1
  log "fault: supernode-2 stopped while training round 1"
  wait_log "$LOGS/fault.log" '\[round   1\]' 300 || die "fault: round 1 never ended: $(grep -v absl "$LOGS/fault.log" | tail -5)"
  # shellcheck disable=SC2086
  compose "$P2" $PROJECT_FILES start supernode-2 >>"$LOGS/compose.log" 2>&1
  log "fault: supernode-2 started again after round 1"
  finish fault "$P2" --silos 2 --rounds 3 --expect-failed --min-accuracy "$MIN_ACC_FAULT"
  grep -q "Node Unavailable\|failed" "$LOGS/fault.log" || die "fault: the run's log does not mention the lost silo"
  python3 - "$LOGS/fault.check.json" <<'EOF' || die "fault: silo-1 charged after it was stopped"
import json, sys
report = json.load(open(sys.argv[1]))
charged = report["charged_rounds"]
assert charged["silo-0"] == list(range(1, report["rounds_completed"] + 1)), charged
assert charged["silo-1"] in ([], [1]), charged  # stopped while training round 1
EOF

  step "2 silos: the restarted SuperNode rejoins"
  for _ in $(seq 1 60); do [ "$(online_nodes)" -ge 2 ] && break; sleep 1; done
  "$FLWR" supernode ls e2e --format json >"$LOGS/rejoin.nodes.json" 2>&1
  python3 - "$LOGS/rejoin.nodes.json" "$t_stop" <<'EOF' || die "rejoin: $(cat "$LOGS/rejoin.nodes.json" | head -40)"
import datetime, json, sys
nodes = json.load(open(sys.argv[1]))["nodes"]
online = [n for n in nodes if n["status"] == "online"]
t_stop = datetime.datetime.fromtimestamp(int(sys.argv[2]), datetime.timezone.utc)
def at(s):
    return datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
new = [n for n in online if at(n["created-at"]) >= t_stop - datetime.timedelta(seconds=2)]
gone = [n for n in nodes if n["status"] != "online"]
assert len(online) == 2 and len(new) == 1 and gone, nodes
print(f"rejoin: online {[n['node-id'] for n in online]}; new after the restart {new[0]['node-id']}; "
      f"the stopped one {gone[0]['node-id']} is {gone[0]['status']}")
EOF
  # the plan of the other runs, on both silos again (in --quick the only fault-free 2-silo run)
  submit rejoin "num-server-rounds=2 $PLAN min-available-nodes=2 min-train-nodes=2"
  finish rejoin "$P2" --silos 2 --rounds 2 --min-accuracy "$MIN_ACC"

  step "2 silos: compose down -v"
  # shellcheck disable=SC2086
  compose "$P2" $PROJECT_FILES down -v >>"$LOGS/compose.log" 2>&1 || die "down -v $P2 failed"
  unset 'PROJECTS[-1]'
}
if want basic2 || want fault2; then
  two_silos
fi

# ----- 3 silos, TLS: generated files, certificates from deploy/gen_certs.sh --------------------
three_silos() { # three_silos PROJECT tls|plain SILOS BASE [OVERRIDE]
  local name="$1" tls="$2" silos="$3" label="$3 silos"
  [ "$2" = tls ] && label="$3 silos, TLS"
  PROJECT_FILES="-f $4${5:+ -f $5}"
  PORT=""
  step "$label: compose up"
  # shellcheck disable=SC2086
  up "$name" "$silos" "$tls" $PROJECT_FILES
  step "$label: run (2 rounds)"
  submit "$name" "num-server-rounds=2 $PLAN min-available-nodes=$silos min-train-nodes=$silos"
  finish "$name" "$name" --silos "$silos" --rounds 2 --min-accuracy "$MIN_ACC"
  step "$label: compose down -v"
  # shellcheck disable=SC2086
  compose "$name" $PROJECT_FILES down -v >>"$LOGS/compose.log" 2>&1 || die "down -v $name failed"
  unset 'PROJECTS[-1]'
}

if want tls3 || want tls2 || want auth2; then
step "certificates (deploy/gen_certs.sh)"
ADADPIGU_CERT_BITS=2048 bash "$ROOT/deploy/gen_certs.sh" -o "$WORK/certs" -f >>"$LOGS/certs.log" 2>&1 ||
  die "gen_certs.sh failed: $(cat "$LOGS/certs.log")"
# the containers' `app` user (uid 49999) reads them; these are throw-away test keys
chmod a+r "$WORK/certs"/*
export ADADPIGU_CERTS_DIR="$WORK/certs"
python3 "$ROOT/deploy/make_compose.py" --silos 3 -o "$WORK/compose-3.yml"
python3 "$ROOT/deploy/make_compose.py" --silos 3 --tls -o "$WORK/compose-3.tls.yml"
fi

want tls3 && three_silos e2e3tls tls 3 "$WORK/compose-3.yml" "$WORK/compose-3.tls.yml"
want plain3 && three_silos e2e3 plain 3 "$WORK/compose-3.yml"
want tls2 && three_silos e2e2tls tls 2 "$ROOT/docker-compose.yml" "$ROOT/docker-compose.tls.yml"

# ----- 2 silos, each with its own data folder -------------------------------------------------------
# Chem97 split by education authority into two per-silo CSV folders (adadpigu split: each with its
# silo.toml and its copy of the schema); every ClientApp mounts its own folder only, the ServerApp
# none of them, and the test accuracy is the silos' noisy federated release.
own_data_scenario() {
  local name=e2eown own="$WORK/own"
  step "2 silos, own data: adadpigu split (Chem97 by education authority, CSV)"
  rm -rf "$own"
  "$(dirname "$FLWR")/adadpigu" split --dataset custom --schema "$ROOT/simulations/schemas/chem97.toml" \
    --source "$DATA/chem97/chem97.csv" --partitioner column --by lea --silos 2 --format csv --out "$own" \
    >>"$LOGS/split.log" 2>&1 || die "adadpigu split failed: $(tail -3 "$LOGS/split.log")"
  chmod -R a+rX "$own" # the containers' `app` user (uid 49999) reads them
  mkdir -p "$WORK/server-data"
  python3 "$ROOT/deploy/make_compose.py" --silos 2 --own-data -o "$WORK/compose-own2.yml"
  export ADADPIGU_SILO_DATA_1="$own/silo-0" ADADPIGU_SILO_DATA_2="$own/silo-1" ADADPIGU_SERVER_DATA_DIR="$WORK/server-data"
  PROJECT_FILES="-f $WORK/compose-own2.yml"
  PORT=""
  step "2 silos, own data: compose up"
  # shellcheck disable=SC2086
  up "$name" 2 plain $PROJECT_FILES
  step "2 silos, own data: run (2 rounds, federated test)"
  submit "$name" "dataset='custom' schema='simulations/schemas/chem97.toml' model='logreg' features='pixels' test-fraction=0.2 num-server-rounds=2 importance-rounds=1 batch-size=128 lr=0.5 clip-norm=1.0 epsilon=3.0 accountant='rdp' seed=0 min-available-nodes=2 min-train-nodes=2"
  # 6 grades, the commonest 21.5%: above 0.22 the model learned something; its noise std is ~0.002
  finish "$name" "$name" --silos 2 --rounds 2 --min-accuracy 0.22 --federated-test
  step "2 silos, own data: compose down -v"
  # shellcheck disable=SC2086
  compose "$name" $PROJECT_FILES down -v >>"$LOGS/compose.log" 2>&1 || die "down -v $name failed"
  unset 'PROJECTS[-1]'
}
want own2 && own_data_scenario

# ----- 2 silos, TLS and SuperNode authentication: registered keys only ----------------------------
# The restarted SuperNode comes back under its registered key, i.e. as the same node, and
# takes part in the rest of the run; an unregistered key is refused.
auth_scenario() {
  local name=e2e2auth
  bash "$ROOT/deploy/gen_supernode_keys.sh" 3 -o "$WORK/keys" -f >>"$LOGS/keys.log" 2>&1 ||
    die "gen_supernode_keys.sh failed: $(cat "$LOGS/keys.log")"
  chmod a+r "$WORK/keys"/*   # throw-away test keys, read by the containers' `app` user
  export ADADPIGU_SUPERNODE_KEYS_DIR="$WORK/keys"
  python3 "$ROOT/deploy/make_compose.py" --silos 2 --tls --auth -o "$WORK/compose-2.tls-auth.yml"
  PROJECT_FILES="-f $ROOT/docker-compose.yml -f $WORK/compose-2.tls-auth.yml"
  PORT=""
  step "2 silos, TLS + SuperNode auth: compose up, keys registered"
  # shellcheck disable=SC2086
  up "$name" 2 tls $PROJECT_FILES -- superlink
  local i ok=0
  for i in 1 2; do
    for _ in $(seq 1 60); do
      if "$FLWR" supernode register "$WORK/keys/supernode-$i.pub" e2e >>"$LOGS/$name.register.log" 2>&1; then
        ok=$((ok + 1))
        break
      fi
      sleep 1
    done
  done
  [ "$ok" -eq 2 ] || die "$name: registering the SuperNodes' keys failed: $(tail -5 "$LOGS/$name.register.log")"
  # shellcheck disable=SC2086
  up "$name" 2 tls $PROJECT_FILES
  "$FLWR" supernode ls e2e --format json >"$LOGS/$name.nodes-before.json" 2>&1

  step "2 silos, TLS + SuperNode auth: an unregistered SuperNode is refused"
  local rogue="${name}-unregistered"
  podman run -d --name "$rogue" --network "${name}_default" \
    -v "$WORK/certs/ca.crt:/certificates/ca.crt:ro" -v "$WORK/keys/supernode-3:/supernode-keys/key:ro" \
    "docker.io/flwr/supernode:$FLWR_VERSION" --root-certificates /certificates/ca.crt --superlink superlink:8000 \
    --auth-supernode-private-key /supernode-keys/key --node-config "partition-id=0 num-partitions=2" \
    >/dev/null || die "$name: cannot start the unregistered SuperNode"
  for _ in $(seq 1 60); do
    [ "$(podman inspect "$rogue" --format '{{.State.Status}}' 2>/dev/null)" = exited ] && break
    sleep 0.5
  done
  podman logs "$rogue" >"$LOGS/$name.unregistered.log" 2>&1 || true
  local state
  state="$(podman inspect "$rogue" --format '{{.State.Status}} {{.State.ExitCode}}' 2>/dev/null || true)"
  podman rm -f "$rogue" >/dev/null 2>&1 || true
  "$FLWR" supernode ls e2e --format json >"$LOGS/$name.nodes-after-rogue.json" 2>&1
  python3 - "$LOGS/$name.nodes-before.json" "$LOGS/$name.nodes-after-rogue.json" <<'PY' ||
import json, sys
before, after = (json.load(open(p))["nodes"] for p in sys.argv[1:3])
assert sorted(n["node-id"] for n in before) == sorted(n["node-id"] for n in after), (before, after)
assert sum(n["status"] == "online" for n in after) == 2, after
PY
    die "$name: the unregistered SuperNode got in: $(cat "$LOGS/$name.nodes-after-rogue.json")"
  # Flower 1.42: "[code: 2004] Failed to activate SuperNode." and exit code 305
  grep -q "Failed to activate SuperNode" "$LOGS/$name.unregistered.log" ||
    die "$name: no refusal in the unregistered SuperNode's log ($state): $(tail -5 "$LOGS/$name.unregistered.log")"
  log "$name: unregistered SuperNode refused (container $state): $(grep -m1 "Failed to activate SuperNode" "$LOGS/$name.unregistered.log" | cut -c1-160)"

  step "2 silos, TLS + SuperNode auth: SuperNode 2 stopped mid-round, rejoins the run"
  # shellcheck disable=SC2086
  node2="$(compose "$name" $PROJECT_FILES ps -q supernode-2)"
  seen="$(podman logs "$node2" 2>&1 | grep -c 'Receiving: train message' || true)"
  local id_before
  id_before="$(python3 -c 'import json,sys; print(sorted(n["node-id"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$LOGS/$name.nodes-before.json")"
  submit "$name-fault" "num-server-rounds=4 $PLAN min-available-nodes=2 min-train-nodes=1 round-timeout=180.0"
  for _ in $(seq 1 240); do
    [ "$(podman logs "$node2" 2>&1 | grep -c 'Receiving: train message' || true)" -gt "$seen" ] && break
    kill -0 "$RUN_PID" 2>/dev/null || die "$name: the run ended before supernode-2 got its first train message"
    sleep 0.5
  done
  # shellcheck disable=SC2086
  compose "$name" $PROJECT_FILES stop supernode-2 >>"$LOGS/compose.log" 2>&1
  log "$name: supernode-2 stopped while training round 1"
  wait_log "$LOGS/$name-fault.log" '\[round   1\]' 300 || die "$name: round 1 never ended"
  # shellcheck disable=SC2086
  compose "$name" $PROJECT_FILES start supernode-2 >>"$LOGS/compose.log" 2>&1
  log "$name: supernode-2 started again after round 1"
  finish "$name-fault" "$name" --silos 2 --rounds 4 --expect-failed --min-accuracy "$MIN_ACC_FAULT"
  "$FLWR" supernode ls e2e --format json >"$LOGS/$name.nodes-end.json" 2>&1
  python3 - "$LOGS/$name-fault.check.json" "$LOGS/$name.nodes-end.json" "$id_before" <<'PY' ||
import ast, json, sys
report = json.load(open(sys.argv[1]))
nodes = json.load(open(sys.argv[2]))["nodes"]
ids = sorted(n["node-id"] for n in nodes)
assert ids == ast.literal_eval(sys.argv[3]), f"node IDs changed: {ids} vs {sys.argv[3]}"
assert sum(n["status"] == "online" for n in nodes) == 2, nodes
charged = report["charged_rounds"]
assert charged["silo-0"] == [1, 2, 3, 4], charged
assert 1 in charged["silo-1"] and charged["silo-1"][-1] == 4 and len(charged["silo-1"]) < 4, charged
print(f"rejoined the same run as the same node: silo-1 charged rounds {charged['silo-1']}, node IDs {ids}")
PY
    die "$name: the restarted SuperNode did not rejoin the run: $(cat "$LOGS/$name-fault.check.json")"

  step "2 silos, TLS + SuperNode auth: compose down -v"
  # shellcheck disable=SC2086
  compose "$name" $PROJECT_FILES down -v >>"$LOGS/compose.log" 2>&1 || die "down -v $name failed"
  unset 'PROJECTS[-1]'
}
if want auth2; then
  auth_scenario
fi
step_end
