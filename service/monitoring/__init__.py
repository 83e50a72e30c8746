"""What the service tells its operators: Prometheus metrics, JSON logs and the drift alarms."""
