"""The engine side of tidal: device layer, process context."""
