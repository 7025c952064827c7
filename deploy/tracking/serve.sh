#!/usr/bin/env bash
# The shared MLflow tracking server: every request needs a login (basic-auth app), runs and
# the registry live in PostgreSQL, artifacts are proxied to object storage (clients need no
# bucket credentials). Used by compose.yaml and, unchanged, by tests/test_deploy.py.
#
# Everything comes from the environment, so no secret is ever on a command line (`ps`):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg:///mlflow: the database only; host, user
#                                 and password come from libpq's PGHOST/PGPORT/PGUSER/PGPASSWORD
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/mlflow
#   MLFLOW_ALLOWED_HOSTS          Host headers the server answers (MLflow 3 refuses others
#                                 with 403): the names the cluster and the browser use, with port
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password on the first start (basic_auth.ini)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql+psycopg:///mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://bucket/mlflow}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS, e.g. mlflow.internal:5000,localhost:5000}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (a random string)}"
# MLflow logs the store URI; the password belongs in PGPASSWORD, where nothing prints it.
case "$MLFLOW_BACKEND_STORE_URI" in
  *://*:*@*) echo "serve.sh: put the database password in PGPASSWORD, not in the URI" >&2; exit 2 ;;
esac

# jlstm uses none of MLflow's server-side jobs (GenAI scorers): one less process running code.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# Read by the basic-auth app: default permission READ, the auth tables in PostgreSQL.
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}"

# --backend-store-uri is not passed: `mlflow server` reads MLFLOW_BACKEND_STORE_URI itself.
exec mlflow server \
  --app-name basic-auth \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
