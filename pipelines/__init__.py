"""Kubeflow pipeline definitions and the `r1zero run` / `r1zero pipeline` commands."""
