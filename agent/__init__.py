"""haproxy-acme-agent: ACME certificates for HAProxy from stable keys."""

__version__ = "0.1.0"
