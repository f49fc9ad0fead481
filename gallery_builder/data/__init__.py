"""Data: built-in datasets (fetching), image folders, and the sources of gallery items."""
