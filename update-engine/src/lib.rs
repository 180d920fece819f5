//! The lucos live-update engine: patch format, relocation, placement,
//! trampolines, safety checks and state transfer.
//!
//! Not written yet: it is the subject of the function-level live patching
//! issue, and builds on vmm-core's pause and page-table walker and on
//! symbol-db. This crate holds its place in the workspace layout.
