"""Cluster side of r1zero: render, validate and launch training jobs (only this package may import
kubernetes / kubeflow-training). See docs/cluster.md."""
