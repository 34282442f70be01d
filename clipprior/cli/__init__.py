"""The ``clipprior`` command-line interface (installed as ``clipprior.cli``)."""
