"""HTTP blueprints: thin translations between Flask and the proxy."""
