//! The bundle crate does no I/O and reads no clock, and every source file says what it is for.

use std::path::Path;

use abide_testkit::tidy::{IO_AND_CLOCK, check_sources};

#[test]
fn the_bundle_crate_does_no_io_and_reads_no_clock() {
    check_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        IO_AND_CLOCK,
    );
}
