"""Networks and their presets."""
