//! The Prometheus textfile for node_exporter's textfile collector.
