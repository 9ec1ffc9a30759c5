//! Operations around the engine: Slack alerts, the metrics textfile, the weekly report and the
//! appliance configuration capture.

pub mod appliance;
pub mod metrics;
pub mod notify;
pub mod report;
