"""`sazd experiment accuracy|speed|stability`: the paper's two claims and this library's own figures.

Each experiment is a grid of independent cells (one training run, one timing, one decode-error
measurement). Cells are appended to ``DIR/cells.jsonl`` as they finish, so an interrupted sweep
resumes where it stopped; at the end the experiment writes ``results.csv``, ``results.json``, PNG
plots and ``report.md`` into ``DIR``. Shared machinery: :mod:`sazd.experiment.common`.
"""
