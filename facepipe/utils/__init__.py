"""Small shared helpers: identity names, folder walks, lazy package attributes."""
