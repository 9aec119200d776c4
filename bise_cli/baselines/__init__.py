"""The baselines BISE is compared with: matched random/magnitude pruning, FFW, DFR, LfF, SoftCon and
BiasCon + BiasBal.

Each builds on the method's training loop and the models; imports only `core`, `data`, `models` and `method`.
"""
