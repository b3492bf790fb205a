"""Insight detection on training curves: jumps, knees, reflection, length growth, aha moments."""
