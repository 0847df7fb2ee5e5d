"""Sub-commands of the ``medfocus`` CLI, one module per area (composed by :mod:`medfocus.cli`)."""
