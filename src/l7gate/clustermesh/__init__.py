"""l7gate.clustermesh"""
