//! Operations around the engine: Slack alerts, the metrics textfile, the weekly report, the
//! status page and the appliance configuration capture.

pub mod appliance;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod status;
