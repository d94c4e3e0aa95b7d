"""l7gate.mtls"""
