"""l7gate.identity"""
