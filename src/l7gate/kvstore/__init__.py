"""l7gate.kvstore"""
