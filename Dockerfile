# Corral's image: the control plane (`corral serve`), the simulator engine and the finetune trainer.
#   docker build -t corral/corral:0.1.0 .        (kind: kind load docker-image corral/corral:0.1.0)
# The router image for business services with llmRouting (vllm-router with Kubernetes service discovery):
#   docker build --target router -t corral/corral:0.1.0-router .
# The finetune trainer for GPU nodes (CUDA torch + bitsandbytes; this image's torch is the CPU build):
#   docker build --target trainer-gpu -t corral/corral:0.1.0-trainer-gpu .
#   CORRAL_KUBERNETES_TRAINER_IMAGE=corral/corral:0.1.0-trainer-gpu
FROM python:3.11-slim AS corral
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[train]" \
 && useradd --uid 10001 --create-home corral
USER 10001
EXPOSE 8080 8000
ENTRYPOINT ["corral"]
CMD ["serve", "--host", "0.0.0.0"]

# torch's CUDA wheels carry the CUDA runtime; the node's driver comes from the NVIDIA container toolkit.
# TORCH_INDEX selects the CUDA build (cu126, cu128, ...) matching the nodes' drivers.
FROM python:3.11-slim AS trainer-gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX} \
 && pip install --no-cache-dir ".[train]" bitsandbytes \
 && useradd --uid 10001 --create-home corral
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["python", "-m", "corral.finetune.trainer"]

FROM corral AS router
USER root
RUN pip install --no-cache-dir vllm-router
USER 10001
ENTRYPOINT ["vllm-router"]
CMD []

FROM corral
