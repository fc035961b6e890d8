"""The ``pathx`` command line (see ``pathx.cli``)."""
