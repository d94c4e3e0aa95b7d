"""l7gate.agent"""
