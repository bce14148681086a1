"""Starting jobs: the tidal command, the launchers, and rank discovery."""
