"""l7gate: sidecarless, identity-based L7 policy enforcement for Kubernetes."""

__version__ = "0.1.0"
