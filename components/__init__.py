"""KFP components wrapping the r1zero stages. Each ``<name>/component.py`` is a thin
``@dsl.component`` that calls :mod:`components.runtime`; the image comes from
:mod:`r1zero.images`."""
