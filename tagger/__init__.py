"""Image -> tags: models, weights, preprocessing, label mapping. Knows nothing of the DB or the watcher."""
