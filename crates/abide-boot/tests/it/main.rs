//! Bootloader formats against files made by the real tools, and the backends against the
//! reference firmware rule.

mod backends;
mod firmware_view;
mod gpt;
mod grubenv;
mod grubscript;
mod systemd_boot;
mod uboot;
mod ubootscript;

/// A file from `tests/data`.
pub fn data(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}

/// Every boot state over groups A and B that the engine can make: each order, each set of
/// bootable groups, no trial or a trial of 1 to 3 boots of a bootable group (32 in all).
pub fn engine_states() -> Vec<abide_boot::BootState> {
    let (a, b) = (
        abide_core::Group::new("A").unwrap(),
        abide_core::Group::new("B").unwrap(),
    );
    let mut out = Vec::new();
    for order in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
        for (a_ok, b_ok) in [(true, true), (true, false), (false, true), (false, false)] {
            let trials = [None]
                .into_iter()
                .chain((1..=3).flat_map(|n| [Some((a.clone(), n)), Some((b.clone(), n))]));
            for trial in trials {
                let mut s = abide_boot::BootState::new(&order);
                s.bootable.insert(a.clone(), a_ok);
                s.bootable.insert(b.clone(), b_ok);
                s.trial = trial;
                if s.trial.as_ref().is_none_or(|(g, _)| s.bootable[g]) {
                    out.push(s);
                }
            }
        }
    }
    out
}
