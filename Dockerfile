# One image for every role (worker, flower, producer, migrations). PyPI's torch wheel runs on CUDA
# when the container is given a GPU and on the CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DEEPCOVID_DATA_DIR=/var/lib/deepcovid

ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
RUN pip install ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY deepcovid ./deepcovid
COPY db ./db
COPY producer ./producer
COPY worker ./worker
COPY training ./training
# openvino: CPU workers score in int8 where the bundle carries int8 networks that passed their drift check
RUN pip install '.[openvino]' \
    && useradd --system --uid 1000 --home-dir /var/lib/deepcovid --create-home deepcovid

USER deepcovid
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO", "-E"]
