"""Pure algorithms: torch in, torch out; no model calls, no I/O."""
