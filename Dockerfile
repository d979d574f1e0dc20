# One image for every sae-registry service in docker-compose.yml: the MLflow tracking server, the
# Ray head and the Ray (GPU) workers. See docs/deploy.md.
#
#   docker compose build                                   # torch==2.13.0 from PyPI (CUDA build)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   # CPU-only
#
# On PyPI, the Linux x86_64 torch wheels are CUDA builds (the CUDA libraries come as nvidia-* wheels),
# which is what GPU workers need; the host only needs the NVIDIA driver and container toolkit.
# TORCH_SPEC picks the version, TORCH_INDEX_URL another wheel index (a CPU-only or other CUDA build).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# torch first and alone: the biggest layer, rebuilt only when TORCH_SPEC/TORCH_INDEX_URL change.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

WORKDIR /opt/sae-registry

# The project's dependencies, from pyproject.toml alone (a stub package stands in for the code), so
# that editing the code does not reinstall Ray and MLflow. ray[default,client]: the dashboard's job
# submission API and Ray Client (ray://); psycopg and boto3: MLflow's PostgreSQL and S3 stores
# (SQLAlchemy 2.1 opens postgresql:// URIs with psycopg 3, not psycopg2); the auth extra: MLflow's
# basic-auth app, which docker-compose.yml's tracking server runs.
COPY pyproject.toml README.md ./
RUN mkdir sae_registry && touch sae_registry/__init__.py \
 && pip install ".[s3,auth]" "ray[default,client]" "psycopg[binary]" boto3 \
 && pip uninstall -y sae-registry && rm -rf sae_registry build

COPY . .
RUN pip install --no-deps . && rm -rf build

# Services run as an unprivileged user; sweep specs shipped with the image are under
# /opt/sae-registry/jobs/ (or send your own with `ray job submit --working-dir .`).
RUN useradd --create-home --uid 1000 sae \
 && mkdir -p /var/lib/mlflow-auth && chown sae:sae /var/lib/mlflow-auth  # the auth app's users (a volume)
USER sae
WORKDIR /home/sae

CMD ["sae-registry", "--help"]
