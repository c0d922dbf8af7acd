"""The DeepSpeed entry (prores-ds-train): `settings` (the schema plus DeepSpeed options, checked),
`cli` (flags or --config), `data` (tokens split over ranks), `loop` (engine, training loop, checkpoints)."""
