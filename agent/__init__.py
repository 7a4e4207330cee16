"""Outpost's gateway agent (``outpost-agent``); what it shares with the controller is the package ``shared``."""
