"""Layer 0, what every layer shares: devices, the package version, background prefetch, network probes, the Ray cluster."""
