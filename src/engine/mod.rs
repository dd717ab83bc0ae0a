//! Orchestration: the tokio tasks that run torrents.
