"""Offline evaluation: list grouping, listwise metrics (one tie rule), AUC / GAUC / Spearman, bootstrap intervals and
paired differences, and scoring a log through an exported model (``scoring.score_log``)."""
