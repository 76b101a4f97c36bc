"""Device profiles shipped with campus-gateway (YAML data; this file makes them a package)."""
