# syntax=docker/dockerfile:1.7
# GPU trainer: TensorFlow 2.21 with its CUDA libraries (pip wheels; the host needs
# only the NVIDIA driver and the NVIDIA container toolkit) plus the project.
# The kubernetes and docker GPU backends of the DAGs run a stage command in it:
#   python -m tasks dvc-stage train cats_vs_dogs --result-json -
# and by hand:
#   docker run --gpus all -v /srv/tl:/opt/airflow/project transfer-learning-trainer:0.1.0 train cats_vs_dogs
# Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t transfer-learning-trainer:0.1.0 .
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-bookworm

# Which TensorFlow of uv.lock: the `gpu` dependency group (tensorflow[and-cuda] and its
# locked CUDA libraries) or `cpu` (tensorflow-cpu).
ARG TF_GROUP=gpu

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
# The same path as in the Airflow image: the DAGs mount the shared project there.
WORKDIR /opt/airflow/project
COPY pyproject.toml uv.lock README.md ./
RUN uv venv /opt/venv \
    && uv export --frozen --no-default-groups --group "${TF_GROUP}" --no-emit-project \
        --no-hashes -o /tmp/requirements.txt \
    && uv pip install --no-cache -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY tasks/ tasks/
COPY dvc.yaml params.yaml .dvcignore ./
COPY data/feedback/README.md data/feedback/
COPY .dvc/config .dvc/.gitignore .dvc/
COPY --chmod=0755 docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint
# Group 0 may write (the docker backend runs the container as the worker's uid:0).
RUN uv pip install --no-cache --no-deps -e . \
    && useradd --uid 10001 --gid 0 --create-home --home-dir /home/trainer trainer \
    && chmod -R g+rwX /opt/airflow/project /home/trainer

ENV HOME=/home/trainer \
    KERAS_HOME=/home/trainer/.keras \
    TASKS_PROJECT=/opt/airflow/project \
    DVC_NO_ANALYTICS=1 \
    TF_CPP_MIN_LOG_LEVEL=2
USER 10001:0

ENTRYPOINT ["/usr/local/bin/trainer-entrypoint"]
CMD ["--help"]
