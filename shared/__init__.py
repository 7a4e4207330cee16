"""What the agent, the controller and outpostctl share: the tunnel protocol and the code both ends run.

The agent and the controller never import each other; both import this package,
and it imports neither.
"""

#: The version of Outpost, in this one place: ``--version`` of every command,
#: the Python package (pyproject.toml reads it) and the .deb (packaging/build-debs checks it).
__version__ = "0.1.0"
