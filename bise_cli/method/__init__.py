"""The BISE method (CVPR 2026): training, the mask search, probes, reweighting, physical pruning, evaluation.

Imports only `bise_cli.core`, `bise_cli.data` and `bise_cli.models`.
"""
