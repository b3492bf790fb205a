"""Evaluation: pass@k / maj@k metrics, the eval stage (``run_eval``), the HTML report."""
