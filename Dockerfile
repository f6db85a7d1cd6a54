# Corral's image: the control plane (`corral serve`), the simulator engine and the finetune trainer.
#   docker build -t corral/corral:0.1.0 .        (kind: kind load docker-image corral/corral:0.1.0)
# The router image for business services with llmRouting (vllm-router with Kubernetes service discovery):
#   docker build --target router -t corral/corral:0.1.0-router .
FROM python:3.11-slim AS corral
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[train]"
EXPOSE 8080 8000
ENTRYPOINT ["corral"]
CMD ["serve", "--host", "0.0.0.0"]

FROM corral AS router
RUN pip install --no-cache-dir vllm-router
ENTRYPOINT ["vllm-router"]
CMD []

FROM corral
