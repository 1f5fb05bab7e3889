"""Data: canonical records, sources, ontology-driven span expansion, windows, the grain pipeline.

Kept empty so that ``import jaxicd.data.<module>`` loads only what it needs.
"""
