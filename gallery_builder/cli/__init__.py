"""The server CLIs: ``cmce`` (``main``) and ``cmce-build-gallery`` (``build``)."""
