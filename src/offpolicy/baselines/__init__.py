"""Other libraries' trainers run as baseline systems beside ours (optional dependencies, imported when used)."""
