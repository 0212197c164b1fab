"""Evaluation helpers: passkey retrieval, lm-eval tasks."""
