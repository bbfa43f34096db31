"""What the web app (`app.py`) serves with: its settings (`config`), the model it loads with the
status line it shows (`loaded_model`), the pool of conversations and their KV caches (`sessions`)
and the example pictures (`examples`)."""
