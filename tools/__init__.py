"""Developer tools, never imported by the service: benchmarks, screenshots."""
