"""The run machinery: the stage registry, the pipeline and its stages, the stage cache, records and run
folders, config validation, fingerprints, cost estimates and tuning objectives.
"""
