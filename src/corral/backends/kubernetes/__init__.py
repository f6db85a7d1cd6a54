"""Kubernetes backend (`CORRAL_BACKEND=kubernetes`): the same API, CLI and UI over a cluster."""

from corral.backends.kubernetes.backend import KubernetesBackend, client_from

__all__ = ["KubernetesBackend", "client_from"]
