"""Database models, queries, search language and keyword writers. Knows nothing of torch."""
