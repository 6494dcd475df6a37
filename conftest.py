"""pytest: the repository root is the package root (flat modules)."""
