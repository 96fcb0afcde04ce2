//! Maintenance windows as a table: (window, local weekday and time) → open or not.

use abide_core::window::{Window, WindowError};

fn w(days: &str, start: &str, end: &str) -> Window {
    let days: Vec<String> = days.split(',').map(str::to_owned).collect();
    Window::parse(&days, start, end).unwrap()
}

#[test]
fn windows_open_and_close_as_written() {
    let weekend = w("sat,sun", "02:00", "04:00");
    let night = w("fri", "23:00", "01:30");
    for (window, day, time, open) in [
        (&weekend, 5, 120, true),
        (&weekend, 5, 239, true),
        (&weekend, 5, 240, false),
        (&weekend, 6, 119, false),
        (&weekend, 0, 150, false),
        // Past midnight: Friday 23:00 to Saturday 01:30.
        (&night, 4, 23 * 60, true),
        (&night, 5, 0, true),
        (&night, 5, 89, true),
        (&night, 5, 90, false),
        (&night, 4, 60, false),
        (&night, 6, 30, false),
    ] {
        assert_eq!(
            window.contains(day, time),
            open,
            "{window:?} on day {day} at minute {time}"
        );
    }
}

#[test]
fn bad_windows_say_why() {
    let d = |s: &str| vec![s.to_owned()];
    assert_eq!(
        Window::parse(&[], "02:00", "04:00"),
        Err(WindowError::Days(vec![]))
    );
    assert_eq!(
        Window::parse(&d("someday"), "02:00", "04:00"),
        Err(WindowError::Days(d("someday")))
    );
    for t in ["24:00", "2:00", "02:60", "0200", "xx:yy"] {
        assert_eq!(
            Window::parse(&d("mon"), t, "04:00"),
            Err(WindowError::Time(t.into()))
        );
    }
    assert_eq!(
        Window::parse(&d("mon"), "03:00", "03:00"),
        Err(WindowError::Empty)
    );
}
