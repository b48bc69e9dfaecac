#!/bin/sh
# Start the MLflow tracking server (Postgres backend, basic-auth app) with its secrets read from files.
#
#   MLFLOW_DB_URI            postgresql://USER@HOST:PORT/DB, without a password (read with psycopg2)
#   MLFLOW_DB_PASSWORD_FILE  the file holding that user's password (a mounted Secret or a systemd credential)
#   MLFLOW_AUTH_CONFIG_PATH  basic_auth.ini for `--app-name basic-auth` (a mounted Secret), read by MLflow
#
# Every argument is passed on to `mlflow server`: the callers (kubernetes/mlflow.yaml,
# systemd/taskatlas-mlflow.service) give --app-name basic-auth, --artifacts-destination, --host,
# --port and --workers. The password goes into MLFLOW_BACKEND_STORE_URI, which `mlflow server` reads in
# place of --backend-store-uri, so it never appears on a command line or in the process list.
set -eu

: "${MLFLOW_DB_URI:?set MLFLOW_DB_URI to postgresql://USER@HOST:PORT/DB (no password)}"
: "${MLFLOW_DB_PASSWORD_FILE:?set MLFLOW_DB_PASSWORD_FILE to the file holding the database password}"
: "${MLFLOW_AUTH_CONFIG_PATH:?set MLFLOW_AUTH_CONFIG_PATH to the basic-auth config file}"
if [ ! -r "$MLFLOW_AUTH_CONFIG_PATH" ]; then
    echo "entrypoint: cannot read MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH" >&2
    exit 1
fi

MLFLOW_BACKEND_STORE_URI=$("${PYTHON:-python3}" - <<'EOF'
import os
import sys
import urllib.parse as up

uri = up.urlsplit(os.environ["MLFLOW_DB_URI"])
if not uri.scheme.startswith("postgresql"):
    sys.exit(f"entrypoint: MLFLOW_DB_URI must be a postgresql:// URI, not {uri.scheme!r}")
if uri.password is not None:
    sys.exit("entrypoint: MLFLOW_DB_URI carries a password; put it in MLFLOW_DB_PASSWORD_FILE instead")
if not uri.username or not uri.hostname:
    sys.exit("entrypoint: MLFLOW_DB_URI needs a user and a host: postgresql://USER@HOST:PORT/DB")
path = os.environ["MLFLOW_DB_PASSWORD_FILE"]
try:
    with open(path, encoding="utf-8") as f:
        password = f.read().strip()
except OSError as e:
    sys.exit(f"entrypoint: cannot read MLFLOW_DB_PASSWORD_FILE: {e}")
if not password:
    sys.exit(f"entrypoint: {path} is empty")
port = f":{uri.port}" if uri.port else ""
netloc = f"{uri.username}:{up.quote(password, safe='')}@{uri.hostname}{port}"
# SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; the image has psycopg2.
scheme = "postgresql+psycopg2" if uri.scheme == "postgresql" else uri.scheme
print(up.urlunsplit(uri._replace(scheme=scheme, netloc=netloc)))
EOF
)
export MLFLOW_BACKEND_STORE_URI
# The job-execution backend is not needed for tracking and slows start-up threefold.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server "$@"
