//! Bacula Director resources (Client, FileSet, Job) generated from the `vm-list.yaml` inventory.
