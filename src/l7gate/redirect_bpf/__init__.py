"""l7gate.redirect_bpf"""
