"""edgeops device agent: signed A/B updates with trial boots and automatic revert."""

__version__ = "0.1.0"
