# syntax=docker/dockerfile:1.7
# Airflow with the project baked in: the official image, our locked dependencies
# (exported from uv.lock), the stage code, the DAGs and the DVC pipeline.
# Build from the repository root:
#   docker build -f docker/airflow.Dockerfile -t transfer-learning-airflow:0.1.0 .
# GPU worker (uv.lock's `gpu` group: TensorFlow with its CUDA libraries, not the CPU build):
#   docker build -f docker/airflow.Dockerfile \
#     --build-arg TF_GROUP=gpu -t transfer-learning-airflow-gpu:0.1.0 .
# No secret is baked in: connections and keys come from the environment at run time.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM apache/airflow:3.3.2-python3.11

# Must match uv.lock (tests/deploy checks): the official image's Airflow is kept, not upgraded.
ARG AIRFLOW_VERSION=3.3.2
ARG TF_GROUP=cpu

USER 0
# DVC needs git; the stage commands need nothing else from the system.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
RUN mkdir -p /opt/airflow/project /opt/airflow/state \
    && chown airflow:0 /opt/airflow/project /opt/airflow/state \
    && chmod 2775 /opt/airflow/project /opt/airflow/state
USER 50000:0

WORKDIR /opt/airflow/project
COPY --chown=airflow:0 pyproject.toml uv.lock README.md ./
# Locked dependencies into the image's virtualenv ($VIRTUAL_ENV=/home/airflow/.local),
# TensorFlow from the dependency group the build argument names (cpu or gpu).
RUN uv export --frozen --no-default-groups --group "${TF_GROUP}" --no-emit-project \
        --no-hashes -o /tmp/requirements.txt \
    && uv pip install --no-cache "apache-airflow==${AIRFLOW_VERSION}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=airflow:0 tasks/ tasks/
COPY --chown=airflow:0 dags/ dags/
COPY --chown=airflow:0 dvc.yaml params.yaml .dvcignore ./
COPY --chown=airflow:0 data/feedback/README.md data/feedback/
COPY --chown=airflow:0 .dvc/config .dvc/.gitignore .dvc/
COPY --chown=airflow:0 --chmod=0755 docker/dvc-remote.sh docker/airflow-entrypoint.sh /opt/airflow/bin/
RUN uv pip install --no-cache --no-deps -e . \
    && chmod -R g+rwX /opt/airflow/project

# Where the DAGs find the pipeline (tasks/orchestration/project.py) and where the shared state
# (per-dataset workspaces, DVC cache, reports) lives: mount one volume there.
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/project/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=false \
    TASKS_PROJECT=/opt/airflow/project \
    TASKS_STATE_DIR=/opt/airflow/state \
    DVC_CACHE_DIR=/opt/airflow/state/dvc-cache \
    DVC_NO_ANALYTICS=1 \
    TF_CPP_MIN_LOG_LEVEL=2

ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/airflow/bin/airflow-entrypoint.sh"]
CMD []
