"""Outpost's gateway agent; this package also carries what the agent, the controller and outpostctl share."""

#: The version of Outpost, in this one place: ``--version`` of every command,
#: the Python package (pyproject.toml reads it) and the .deb (packaging/build-debs checks it).
__version__ = "0.1.0"
