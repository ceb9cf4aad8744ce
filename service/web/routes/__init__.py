"""HTTP handlers, one module per part of the API; app.py assembles their routes."""
