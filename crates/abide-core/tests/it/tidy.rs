//! The core does no I/O, reads no clock, sleeps and spawns nothing, and every source file says
//! what it is for.

use std::path::Path;

use abide_testkit::tidy::{IO_AND_CLOCK, check_sources};

#[test]
fn the_core_is_pure() {
    let mut forbidden = IO_AND_CLOCK.to_vec();
    forbidden.extend(["std::thread", "std::process", "std::io"]);
    check_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &forbidden,
    );
}
