"""l7gate.observe"""
