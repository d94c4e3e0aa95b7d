"""l7gate.k8s"""
