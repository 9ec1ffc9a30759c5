//! Operations around the engine: Slack alerts, the metrics textfile, the weekly report, the
//! status page and the appliance configuration capture.
//!
//! Inside: `outcome` (a run as ops sees it) ← `notify` (Slack), `metrics` (textfile) ←
//! `report` (the engine's observer that does both and records the catalog). `status` reads the
//! catalog for `vm-backup status` and the page on the share. `appliance` stands alone.

pub mod appliance;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod report;
pub mod status;
