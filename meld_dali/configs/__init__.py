"""Built-in recipes: `seed` (the full MELD recipe) and `demo` (small, CPU-friendly)."""
