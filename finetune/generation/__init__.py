"""Text generation shared by `generate`, `chat`, `serve` and `eval`: sampling settings (params), the context
window policy (window), token sampling (sampling), the batched decoding engine (engine), prompts built as in
training (generator) and loading a run's model for it (loading)."""
