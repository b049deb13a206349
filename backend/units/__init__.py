"""Units (neurons, transcoder features) across a corpus: the index, dashboards, labels, search.

corpus.py (documents) -> build.py (one resumable pass, stats.py per layer) -> index.py (on
disk) -> service.py (find, open, background builds) -> dashboard.py, labels.py, search.py.
"""
