# lmforge on a GPU machine: an official PyTorch CUDA runtime image with lmforge installed and
# lmforge-train as the entry point.
#   docker build -t lmforge .
#   docker run --gpus all --rm -v "$PWD/logs:/lmforge/logs" -e WANDB_API_KEY \
#       lmforge experiment=gutenberg_bpe trainer=gpu
# Arguments after the image name are Hydra overrides. W&B credentials come from the
# environment, never from the image or the config.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LMFORGE_ROOT=/lmforge \
    TORCHINDUCTOR_CACHE_DIR=/lmforge/logs/.inductor

WORKDIR /lmforge

# This checkout, editable so that conf/ and data/ beside src/ are found, with the version ranges
# of pyproject.toml (DL3013 asks for pins a local install cannot carry); the image's torch stays.
COPY pyproject.toml README.md ./
COPY src ./src
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -e ".[sources,hub]"

COPY conf ./conf
COPY data ./data

RUN useradd --create-home --uid 1000 lmforge \
    && mkdir -p /lmforge/logs \
    && chown -R lmforge /lmforge/logs /lmforge/data
USER 1000

VOLUME ["/lmforge/logs"]
ENTRYPOINT ["lmforge-train"]
