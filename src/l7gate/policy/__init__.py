"""l7gate.policy"""
