"""Domain text: built-in corpora, hub and local datasets, splits and packing, downloads."""
