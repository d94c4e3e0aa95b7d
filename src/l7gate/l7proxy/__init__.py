"""l7gate.l7proxy"""
