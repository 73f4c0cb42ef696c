"""Settings: the typed configs of every command, their rules, and one run per output folder (below the faces, above every other layer)."""
