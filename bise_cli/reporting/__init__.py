"""What is shown from the records: `bise table`, the model card and report, plots, the terminal summary,
exports, experiment tracking, efficiency measurements and the papers' reference numbers.
"""
