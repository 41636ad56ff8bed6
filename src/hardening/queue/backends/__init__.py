"""Queue backends: one protocol (``base.QueueBackend``), one implementation per store."""
