"""GPU inventory. NVML only (nvidia-ml-py): the control plane never needs torch to list GPUs."""
