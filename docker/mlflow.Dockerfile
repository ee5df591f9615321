# syntax=docker/dockerfile:1.7
# MLflow tracking server: the official image plus the Postgres driver, the S3
# client and Flask-WTF (the basic-auth app), started by mlflow/serve.sh; the
# accounts job runs mlflow/accounts.py. Server mode when MLFLOW_BACKEND_STORE_URI
# and MLFLOW_ARTIFACTS_DESTINATION are set (see docker/compose.yaml).
# Build from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t transfer-learning-mlflow:0.1.0 .
FROM ghcr.io/mlflow/mlflow:v3.17.2

# The versions uv.lock pins (tests/deploy checks).
RUN pip install --no-cache-dir "psycopg2-binary==2.9.13" "boto3==1.43.117" "flask-wtf==1.3.0" \
    && useradd --uid 10001 --gid 0 --create-home --home-dir /home/mlflow mlflow
COPY --chmod=0755 mlflow/serve.sh /usr/local/bin/mlflow-serve
COPY --chmod=0644 mlflow/accounts.py /usr/local/bin/mlflow-accounts

ENV MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_EMBEDDED_DIR=/home/mlflow/store
USER 10001:0
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/mlflow-serve"]
