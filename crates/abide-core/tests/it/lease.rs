//! The reboot-lease decision as a table.

use abide_core::lease::{LeaseAsk, WindowNow, decide};
use abide_core::window::Window;
use expect_test::expect;

fn ask(
    held: bool,
    window: Option<(u8, u16)>,
    leased: u64,
    max: Option<u64>,
    healthy: u64,
    quorum: Option<u64>,
) -> LeaseAsk {
    LeaseAsk {
        held,
        // Saturday and Sunday, 02:00 to 04:00.
        window: window.map(|(weekday, minute)| WindowNow {
            window: Window::parse(&["sat".into(), "sun".into()], "02:00", "04:00").unwrap(),
            weekday,
            minute,
        }),
        leased,
        max_unavailable: max,
        healthy_others: healthy,
        quorum,
    }
}

#[test]
fn the_lease_decision_table() {
    let cases = [
        ("no limits", ask(false, None, 7, None, 0, None)),
        (
            "under max_unavailable",
            ask(false, None, 1, Some(2), 0, None),
        ),
        ("at max_unavailable", ask(false, None, 2, Some(2), 9, None)),
        ("quorum kept", ask(false, None, 0, None, 3, Some(3))),
        ("quorum would break", ask(false, None, 0, None, 2, Some(3))),
        (
            "window open (Sat 03:00)",
            ask(false, Some((5, 180)), 0, Some(1), 5, Some(1)),
        ),
        (
            "window closed (Sat 04:00)",
            ask(false, Some((5, 240)), 0, None, 5, None),
        ),
        (
            "window closed (Mon 03:00)",
            ask(false, Some((0, 180)), 0, None, 5, None),
        ),
        (
            "closed window before max",
            ask(false, Some((0, 180)), 9, Some(1), 0, Some(5)),
        ),
        (
            "max before quorum",
            ask(false, None, 1, Some(1), 0, Some(5)),
        ),
        (
            "renewal, limits reached",
            ask(true, Some((0, 180)), 9, Some(1), 0, Some(5)),
        ),
    ];
    let out: String = cases
        .iter()
        .map(|(name, a)| format!("{name}: {:?}\n", decide(a)))
        .collect();
    expect![[r#"
        no limits: Grant
        under max_unavailable: Grant
        at max_unavailable: Refuse(Unavailable { leased: 2, max: 2 })
        quorum kept: Grant
        quorum would break: Refuse(Quorum { healthy: 2, quorum: 3 })
        window open (Sat 03:00): Grant
        window closed (Sat 04:00): Refuse(WindowClosed)
        window closed (Mon 03:00): Refuse(WindowClosed)
        closed window before max: Refuse(WindowClosed)
        max before quorum: Refuse(Unavailable { leased: 1, max: 1 })
        renewal, limits reached: Renew
    "#]]
    .assert_eq(&out);
}
