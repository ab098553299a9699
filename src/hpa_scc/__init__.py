"""hpa_scc: per-cell protein localisation in Human Protein Atlas images.

    python -m hpa_scc --help
"""

__version__ = "0.1.0"
