//! Slack incoming-webhook alerts and run summaries.
