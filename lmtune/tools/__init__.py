"""Command-line tools and helpers: tiny local models for the demo and tests."""
