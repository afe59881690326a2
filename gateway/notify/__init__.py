"""Incident channels: deliver alarms to the people on duty, track acknowledgement, escalate (docs/channels.md)."""
