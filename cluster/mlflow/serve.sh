#!/usr/bin/env bash
# The team's MLflow tracking server: runs, metrics and the model registry in a database, artifacts
# (checkpoints, models, Pareto plots) in an object store that the server proxies, so clients need
# only the server's URL, not the store's credentials. The same flags as cluster/mlflow/mlflow.yaml.
#
#   export MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://mlflow:PASSWORD@db.internal:5432/mlflow'
#   export MLFLOW_ARTIFACTS_DESTINATION='s3://my-bucket/mlflow'      # AWS_* credentials or an instance role
#   export MLFLOW_SERVER_ALLOWED_HOSTS='mlflow.internal:*,localhost:*'  # the names clients use, with :port
#   cluster/mlflow/serve.sh                                          # listens on 0.0.0.0:5000
#
# Needs `pip install mlflow==3.17.2 psycopg2-binary boto3` (or the image ghcr.io/mlflow/mlflow:v3.17.2-full).
# MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS override 0.0.0.0, 5000, 4. Credentials come from the
# environment only: nothing secret is written here.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set it to the tracking database, e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it to the artifact store, e.g. s3://BUCKET/mlflow}"
# MLflow refuses requests whose Host header it does not know (DNS-rebinding protection): list every
# name:port clients use. Its default covers only localhost and private IP addresses.
: "${MLFLOW_SERVER_ALLOWED_HOSTS:?list the host names clients use, e.g. mlflow.internal:*,localhost:*}"

# The backend store URI (it holds the database password) stays in the environment, where
# `mlflow server` reads it, rather than on the command line, where `ps` would show it.
export MLFLOW_BACKEND_STORE_URI
exec "${MLFLOW:-mlflow}" server \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS" \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"
