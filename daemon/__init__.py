"""phototag application: CLI, config, watcher, queue, batch worker, scheduler, service."""
