//! Cisco ASAv (and other agent-less appliances): `write memory` before the snapshot and configuration capture over SSH after the copy.
