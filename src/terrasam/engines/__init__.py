"""Engines run the per-tile job (read -> AMG -> mask records) over a tile list.

``local``: one model in this process, tiles streamed through it, results spilled per tile to a
work directory so that a killed run resumes.
"""
