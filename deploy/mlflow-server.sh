#!/usr/bin/env bash
# A shared MLflow tracking server: PostgreSQL for runs and the registry, an object store for
# artifacts (served through the server, so clients need no bucket credentials).
#   MLFLOW_DB=postgresql://mlflow:secret@db:5432/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow ./mlflow-server.sh
set -euo pipefail
exec mlflow server \
  --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "${MLFLOW_DB:?set MLFLOW_DB to a PostgreSQL URI}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to an object-store URI}" \
  --serve-artifacts
