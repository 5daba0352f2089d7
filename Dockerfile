# lmforge on a GPU machine: the Python and torch versions the tests run on (TORCH_VERSION is the
# pin of constraints-cpu.txt; tests/test_install.py checks they agree), torch as PyPI's CUDA
# build (it carries its CUDA libraries; the host brings the driver), a C compiler for
# torch.compile, lmforge installed from its wheel, lmforge-train as the entry point. It runs in
# /work: prepared token sets in /work/data/prepared, runs in /work/logs (README: Container).
#   docker build -t lmforge .
#   docker run --gpus all --rm --user "$(id -u):$(id -g)" -e WANDB_API_KEY \
#       -v "$PWD/logs:/work/logs" -v "$PWD/data/prepared:/work/data/prepared" \
#       -v "$PWD/../shared/data:/shared/data:ro" \
#       lmforge experiment=gutenberg_bpe trainer=gpu
# Arguments after the image name are Hydra overrides. W&B credentials come from the
# environment, never from the image or the config.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0

# HOME: caches and W&B settings of whichever --user runs the container go to /tmp
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    LMFORGE_SHARED_DATA=/shared/data \
    TORCHINDUCTOR_CACHE_DIR=/work/logs/.cache/inductor \
    TRITON_CACHE_DIR=/work/logs/.cache/triton

# torch.compile (task.compile=auto turns it on on CUDA) compiles kernels with gcc at run time.
# Debian's current compiler, not a pinned one (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The dependencies first, read from pyproject.toml alone, so that editing the source reuses this
# layer: the runtime ones and the extras sources, hub, plot and sweep, with the version ranges of
# pyproject.toml (DL3013 asks for pins it does not carry) and torch pinned.
COPY pyproject.toml /tmp/lmforge/
# hadolint ignore=DL3013
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/lmforge/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + [d for e in ('sources', 'hub', 'plot', 'sweep') for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "torch==${TORCH_VERSION}"

# lmforge itself, as a wheel: conf/ and the bundled data sets travel inside the package.
COPY README.md /tmp/lmforge/
COPY conf /tmp/lmforge/conf
COPY data /tmp/lmforge/data
COPY src /tmp/lmforge/src
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps /tmp/lmforge && rm -rf /tmp/lmforge /tmp/requirements.txt

# Any --user can write the two volumes (a bind mount keeps its owner: pass your own UID).
WORKDIR /work
RUN useradd --no-create-home --uid 1000 lmforge \
    && mkdir -p /work/logs /work/data/prepared \
    && chmod 1777 /work/logs /work/data/prepared
USER 1000

VOLUME ["/work/logs", "/work/data/prepared"]
ENTRYPOINT ["lmforge-train"]
