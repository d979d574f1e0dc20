#!/bin/sh
# The object store's buckets and least-privilege users, with MinIO's client `mc` and the root keys.
# Idempotent. docker-compose.yml's minio-init service runs it; natively, run it where `mc` is
# installed (docs/deploy.md). Two users, each reaching only its own buckets:
#   MINIO_MLFLOW_USER (default sae-mlflow): MLFLOW_BUCKET, MLflow's artifacts (the MLflow server only)
#   MINIO_NODE_USER (default sae-node): ACTIVATIONS_BUCKET and RAY_RESULTS_BUCKET (Ray nodes, trials)
# Needs MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, MINIO_MLFLOW_PASSWORD, MINIO_NODE_PASSWORD; MINIO_URL
# defaults to http://minio:9000 (the compose service).
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MINIO_MLFLOW_PASSWORD:?}" "${MINIO_NODE_PASSWORD:?}"
url=${MINIO_URL:-http://minio:9000}
mlflow_bucket=${MLFLOW_BUCKET:-mlflow}
activations_bucket=${ACTIVATIONS_BUCKET:-activations}
results_bucket=${RAY_RESULTS_BUCKET:-ray-results}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

policy() {  # policy NAME BUCKET...: list, read and write these buckets, nothing else
  name=$1; shift
  resources=""
  for bucket in "$@"; do
    resources="$resources\"arn:aws:s3:::$bucket\",\"arn:aws:s3:::$bucket/*\","
  done
  printf '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":[%s]}]}\n' \
    "${resources%,}" >"$work/$name.json"
  mc admin policy create sae "$name" "$work/$name.json"
}

user() {  # user NAME SECRET POLICY: create it (or set its secret), with that policy attached
  mc admin user add sae "$1" "$2"
  mc admin policy attach sae "$3" --user "$1" || mc admin user info sae "$1" | grep -q "$3"
}

mc alias set sae "$url" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in "$mlflow_bucket" "$activations_bucket" "$results_bucket"; do
  mc mb --ignore-existing "sae/$bucket"
done
policy sae-mlflow "$mlflow_bucket"
policy sae-node "$activations_bucket" "$results_bucket"
user "${MINIO_MLFLOW_USER:-sae-mlflow}" "$MINIO_MLFLOW_PASSWORD" sae-mlflow
user "${MINIO_NODE_USER:-sae-node}" "$MINIO_NODE_PASSWORD" sae-node
echo "minio-init: buckets $mlflow_bucket $activations_bucket $results_bucket; users ready"
