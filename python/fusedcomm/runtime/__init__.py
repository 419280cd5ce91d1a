"""Process-wide runtime state shared by every op family."""
