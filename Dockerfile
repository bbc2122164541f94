# One image for the API, the model workers and the webhook worker; build arguments pick the platform:
#   CPU (default)  docker build -t inferq:cpu .
#   NVIDIA         docker build -t inferq:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#   Intel GPU      docker build -t inferq:xpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/xpu \
#                               --build-arg GPU_RUNTIME=intel .
# docker-compose.yml builds all three (docs/DEPLOY.md).
#
# Layers, from the least to the most often changed: system packages, torch, the dependencies listed in
# pyproject.toml (built from pyproject.toml alone), then the source, installed with --no-deps: editing the source
# rebuilds only the last layers, in seconds.

# Any Debian-based image: one without python3 gets Debian's from apt (with venv, and the headers the CPU kernel's
# build includes; python:* images have them).
ARG BASE_IMAGE=python:3.11-slim-trixie
FROM ${BASE_IMAGE} AS system

# intel: the Intel GPU user-space runtime (the Level Zero loader libze1, the GPU's Level Zero driver
# libze-intel-gpu1 and OpenCL's intel-opencl-icd). Debian 13 (trixie) ships only the loader; the runtime is in
# Debian from forky (testing) on, so these three come from there, pinned to be taken only when asked for (apt then
# takes the newer libc6/libstdc++6 they need from forky too; the rest stays trixie's).
ARG GPU_RUNTIME=none
# g++: the CPU attention kernel is built at run time with the machine's compiler (engine/attention/cpu_kernels.py),
# and Triton compiles its kernel launchers with it on GPUs.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    packages="g++"; \
    command -v python3 >/dev/null || packages="$packages python3 python3-venv python3-dev"; \
    apt-get install -y --no-install-recommends $packages; \
    case "$GPU_RUNTIME" in \
      none) ;; \
      intel) \
        echo "deb http://deb.debian.org/debian forky main" > /etc/apt/sources.list.d/forky.list; \
        printf 'Package: *\nPin: release n=forky\nPin-Priority: 100\n' > /etc/apt/preferences.d/forky; \
        apt-get update; \
        apt-get install -y --no-install-recommends -t forky libze1 libze-intel-gpu1 intel-opencl-icd; \
        getent group render >/dev/null || groupadd --system render ;; \
      *) echo "GPU_RUNTIME must be none or intel, not $GPU_RUNTIME" >&2; exit 1 ;; \
    esac; \
    rm -rf /var/lib/apt/lists/*

# A virtual environment: the same layout on python:* images and on Debian's python3 (which pip may not touch).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The dependency list, out of pyproject.toml in a stage of its own: the layer that installs it is rebuilt only when
# the list changes, not at every edit of pyproject.toml.
FROM system AS requirements
COPY pyproject.toml docker/requirements.py /tmp/
RUN python /tmp/requirements.py /tmp/pyproject.toml > /tmp/requirements.txt

FROM system
# torch first, from the platform's index (its CUDA or XPU libraries and Triton come along from there).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"

# The dependencies, torch held to the build above.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt "torch==$(python -c 'from importlib.metadata import version; print(version("torch"))')" \
    && rm /tmp/requirements.txt

COPY docker/entrypoint.sh /usr/local/bin/inferq-entrypoint
COPY docker/healthcheck.py /usr/local/bin/inferq-healthcheck
RUN sed -i '1i #!/opt/venv/bin/python' /usr/local/bin/inferq-healthcheck \
    && chmod 755 /usr/local/bin/inferq-entrypoint /usr/local/bin/inferq-healthcheck

# The source, last.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY engine engine
RUN pip install --no-deps . && inferq --help >/dev/null

# Not root. INFERQ_HOME (/data) holds the demo model; HOME the CPU kernel's and Triton's build caches.
RUN useradd --create-home --uid 10001 --user-group inferq && install -d -o inferq -g inferq /data
USER inferq
ENV INFERQ_HOME=/data
EXPOSE 8000
ENTRYPOINT ["inferq-entrypoint"]
CMD ["inferq", "api", "--host", "0.0.0.0", "--port", "8000"]
