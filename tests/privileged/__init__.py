"""Tests that need root: network namespaces, veths, BPF."""
