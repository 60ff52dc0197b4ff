"""Stand-ins that exist only so that other tools' configs run (reached through lmtune.config.aliases)."""
