# One image for the API, the GPU worker and the webhook worker.
# TORCH_INDEX_URL picks the PyTorch build: CPU by default; https://download.pytorch.org/whl/xpu for Intel GPUs,
# https://download.pytorch.org/whl/cu128 for NVIDIA.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 INFERQ_HOME=/data
WORKDIR /app
RUN pip install --no-cache-dir "torch>=2.6,<2.15" --index-url "$TORCH_INDEX_URL"
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY engine engine
RUN pip install --no-cache-dir .
EXPOSE 8000
CMD ["inferq", "api", "--host", "0.0.0.0", "--port", "8000"]
