"""The bottom layer: what every other layer shares and nothing of bise_cli beneath it.

Errors, config defaults and setting roles, metric names and their computation, escaping, progress bars,
precision and device settings, atomic files and file locks. Modules here import only from `bise_cli.core`.
"""
