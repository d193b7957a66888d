# The app image: Flower's SuperExec (runs ServerApps and ClientApps as processes) plus
# this project's dependencies. Used by the superexec-* services of docker-compose.yml:
#   docker compose build            (or: docker build -t adadpigu-fl-superexec:0.1.0 .)
# The app code itself arrives with each run (the FAB that `flwr run` submits); installing
# the project here provides its dependencies (torch, opacus, dp-accounting, ...).
#
# Flower's images ship a Python 3.13 venv by default; the *-py3.11-ubuntu24.04 tags of the
# same version exist too (e.g. --build-arg FLWR_IMAGE_TAG=1.42.0-py3.11-ubuntu24.04).
#
# A CPU-only image (about 1 GB instead of about 6.7 GB, no CUDA libraries): take torch from
# PyTorch's CPU index,
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Layers, from the least to the most often changed: torch, the project's dependencies (read
# from pyproject.toml only), then the project's code (a code change rebuilds only that layer).
ARG FLWR_IMAGE_TAG=1.42.0
FROM flwr/superexec:${FLWR_IMAGE_TAG}

WORKDIR /app

# torch first, the pinned pair of the README (CPU and CUDA wheels from PyPI; TORCH_INDEX_URL
# empty = PyPI's default build, which on x86_64 Linux is the CUDA one).
ARG TORCH_INDEX_URL=""
RUN python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        torch==2.14.1 torchvision==0.29.1

# The project's remaining dependencies, from pyproject.toml alone (cached until it changes).
# flwr is already in the image (same version); the [simulation] extra would add Ray, which
# the deployment runtime does not use.
COPY --chown=app:app pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d.replace('flwr[simulation]', 'flwr') for d in deps))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no dependency resolution left to do).
COPY --chown=app:app README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client ./client
COPY --chown=app:app server ./server
COPY --chown=app:app simulations ./simulations
RUN sed -i 's/flwr\[simulation\]/flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir --no-deps . \
    && python -c "import flwr, torch, opacus, dp_accounting, server.app, client.app; print('flwr', flwr.__version__, 'torch', torch.__version__)" \
    && mkdir -p /app/runs

# Data is mounted read-only at /data (torchvision layout); run folders go to /app/runs.
ENV ADADPIGU_DATA_DIR=/data \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

ENTRYPOINT ["flower-superexec"]
CMD ["--help"]
