"""Web app, CLI and the Studio service that wires the library together."""
