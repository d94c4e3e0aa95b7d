"""l7gate.xds"""
