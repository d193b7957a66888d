# The app image: Flower's SuperExec (runs ServerApps and ClientApps as processes) plus
# this project's dependencies. Used by the superexec-* services of docker-compose.yml:
#   docker compose build            (or: docker build -t adadpigu-fl-superexec:0.1.0 .)
# The app code itself arrives with each run (the FAB that `flwr run` submits); installing
# the project here provides its dependencies (torch, opacus, dp-accounting, ...).
#
# Flower's images ship a Python 3.13 venv by default; the *-py3.11-ubuntu24.04 tags of the
# same version exist too (e.g. --build-arg FLWR_IMAGE_TAG=1.42.0-py3.11-ubuntu24.04).
ARG FLWR_IMAGE_TAG=1.42.0
FROM flwr/superexec:${FLWR_IMAGE_TAG}

WORKDIR /app

# torch first, the pinned pair of the README (CPU and CUDA wheels from PyPI).
RUN python -m pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# The project and its remaining dependencies. flwr is already in the image (same version);
# drop the [simulation] extra, which would add Ray (not used by the deployment runtime).
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common ./common
COPY --chown=app:app client ./client
COPY --chown=app:app server ./server
COPY --chown=app:app simulations ./simulations
RUN sed -i 's/flwr\[simulation\]/flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import flwr, torch, opacus, dp_accounting; print('flwr', flwr.__version__, 'torch', torch.__version__)" \
    && mkdir -p /app/runs

# Data is mounted read-only at /data (torchvision layout); run folders go to /app/runs.
ENV ADADPIGU_DATA_DIR=/data \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

ENTRYPOINT ["flower-superexec"]
CMD ["--help"]
