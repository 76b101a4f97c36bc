"""ONVIF cameras: events over pull-point subscriptions, health, evidence snapshots, video checks."""
