"""The web dashboard (``/ui/``) on the management listener: server-rendered pages, nothing from the Internet."""
